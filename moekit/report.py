"""``moekit report``: one self-contained HTML page of a training run or of a ``moekit compare`` study.

The page needs nothing but itself: plots are PNGs embedded as base64 ``data:`` URLs, the style sheet is inline,
there is no script and nothing is fetched, so it opens offline and can be mailed or attached as one file.

- A **run** folder (``moekit train --out``): the summary (validation loss, bits/byte, tokens/s, MFU, params),
  the training plots (``loss.png``, ``expert_load.png``), routing statistics per MoE layer (load CV, max/mean,
  dead experts and each variant's own statistics), the routing analysis when ``moekit analyze`` wrote one into
  ``RUN/analysis`` (its table and plots), text samples generated from the checkpoint, and every config key with
  its value and meaning.
- A **study** folder (``moekit compare --out``): the results table and notes of ``results.md``, its plots
  (validation curves, loss against FLOPs), and a per-run table from ``results.json``.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .configs import ConfigError

__all__ = ["ReportError", "build_report", "write_report"]

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d2430; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d8dde6; }
.sub { color: #5a6475; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d8dde6; padding: .25em .6em; text-align: right; vertical-align: top; }
th { background: #f1f4f8; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e4e8ef; }
figcaption { color: #5a6475; font-size: .9em; }
pre { background: #f6f8fb; border: 1px solid #e4e8ef; padding: .7em; white-space: pre-wrap; overflow-x: auto; }
.sample { font-family: ui-monospace, monospace; }
"""


class ReportError(ConfigError):
    """The path is not a run or study folder, or the report cannot be written; the message says which."""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _esc("-" if value is None else value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return _esc(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "", cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f'<section><h2 id="{_esc(re.sub(r"[^a-z0-9]+", "-", name.lower()))}">{_esc(name)}</h2>'
                   f"{content}</section>" for name, content in sections if content)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f'<body><h1>{_esc(title)}</h1><p class="sub">{_esc(subtitle)}</p>{body}</body></html>\n')


def _markdown_tables(text: str) -> str:
    """``results.md`` as HTML: pipe tables become tables, image links are dropped (embedded separately),
    headings and paragraphs stay text."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append(_table(header, rows))
            continue
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{_esc(line.lstrip('#').strip().replace('`', ''))}</h{level}>")
        elif line.strip() and not line.lstrip().startswith("!["):
            out.append(f"<p>{_esc(line.replace('`', '').replace('**', ''))}</p>")
        i += 1
    return "".join(out)


def _run_sections(run_dir: Path, samples: int, sample_tokens: int) -> tuple[str, str, list[tuple[str, str]]]:
    from .config_help import describe_config
    from .training.checkpoint import read_json, read_state
    from .training.runs import read_run_config

    cfg = read_run_config(run_dir)
    state = read_state(run_dir)
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    sections = []
    if summary:
        rows: list[tuple[str, Any]] = [("validation loss (nats/token)", summary.get("val_loss")),
                ("validation bits/byte", summary.get("val_bpb")), ("steps", summary.get("step")),
                ("tokens", summary.get("tokens")), ("tokens/s", summary.get("tokens_per_s")),
                ("MFU", f"{summary.get('mfu', 0.0):.1%}"), ("wall time (s)", summary.get("wall_time_s")),
                ("parameters", summary.get("total_params")), ("active parameters/token", summary.get("active_params")),
                ("training FLOPs/token", summary.get("flops_per_token")), ("data", summary.get("data"))]
        sections.append(("Summary", _table(["figure", "value"], rows, cls="summary")))
    else:
        note = (f"<p>No summary.json yet: the checkpoint is at step {state['step']:,} of "
                f"{cfg.train.max_steps:,} (an interrupted or running run).</p>")
        sections.append(("Summary", note))
    figures = [_figure(run_dir / name, caption) for name, caption in
               (("loss.png", "Training and validation loss"), ("expert_load.png", "Expert load per MoE layer"))
               if (run_dir / name).is_file()]
    sections.append(("Training plots", "".join(figures)))
    layers = summary.get("layers") or {}
    if layers:
        standard = ["load_cv", "max_over_mean", "load_entropy", "token_entropy", "dead_experts", "drop_rate"]
        extra = sorted({k for row in layers.values() for k in row} - set(standard) - {"tokens", "bias_drift"})
        cols = [c for c in standard if any(c in row for row in layers.values())] + extra
        layer_rows = [[name] + [int(row[c]) if c == "dead_experts" and c in row else row.get(c) for c in cols]
                for name, row in layers.items()]
        sections.append(("Routing statistics per layer", _table(["layer", *cols], layer_rows, cls="routing") +
                         "<p>load_cv: coefficient of variation of the experts' loads (0 = balanced); max_over_mean: "
                         "the busiest expert's load over the mean; entropies divided by ln E; dead_experts: experts "
                         "that received no token (validation data).</p>"))
    analysis = run_dir / "analysis"
    if (analysis / "table.txt").is_file():
        plots = "".join(_figure(analysis / name, caption) for name, caption in
                        (("load.png", "Share of assignments per expert"),
                         ("coactivation.png", "Expert co-activation"), ("entropy.png", "Routing entropy"))
                        if (analysis / name).is_file())
        sections.append(("Routing analysis (moekit analyze)",
                         f"<pre>{_esc((analysis / 'table.txt').read_text(encoding='utf-8'))}</pre>{plots}"))
    if samples:
        sections.append(("Samples", _samples(run_dir, samples, sample_tokens)))
    config_rows = [(k, v, m) for k, v, m in describe_config(cfg) if v != ""]
    sections.append(("Configuration", _table(["key", "value", "meaning"], config_rows, cls="config")))
    subtitle = (f"{cfg.name}: {cfg.description} — run folder {run_dir}, checkpoint at step {state['step']:,}")
    return f"moekit run report: {run_dir.name}", subtitle, sections


def _samples(run_dir: Path, count: int, tokens: int) -> str:
    import torch

    from .data import get_tokenizer
    from .serving import generate
    from .training.runs import load_run

    cfg, model, _ = load_run(run_dir, "cpu")
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    prompts = ["def ", "import ", "class ", "    return ", "# "][:count]
    rows = []
    for seed, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = generate(model, ids, tokens, temperature=0.8, top_p=0.95, seed=seed)
        rows.append(f'<tr><td class="text"><pre class="sample">{_esc(prompt)}</pre></td><td class="text">'
                    f'<pre class="sample">{_esc(tokenizer.decode(out[0].tolist()))}</pre></td></tr>')
    return ("<p>Generated from the checkpoint (temperature 0.8, top-p 0.95, "
            f"{tokens} tokens, seeds 0–{len(prompts) - 1}).</p><table class=\"samples\"><thead><tr><th>prompt</th>"
            f"<th>continuation</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _study_sections(study_dir: Path) -> tuple[str, str, list[tuple[str, str]]]:
    from .training.checkpoint import read_json

    results = read_json(study_dir / "results.json")
    sections = []
    md = study_dir / "results.md"
    if md.is_file():
        sections.append(("Results", _markdown_tables(md.read_text(encoding="utf-8"))))
    figures = [_figure(study_dir / name, caption) for name, caption in
               (("val_curves.png", "Validation bits/byte against training tokens (mean ± sd over seeds)"),
                ("loss_vs_flops.png", "Validation bits/byte against training FLOPs"))
               if (study_dir / name).is_file()]
    sections.append(("Plots", "".join(figures)))
    runs = results.get("runs") or []
    if isinstance(runs, list) and runs:
        cols = ["arm", "seed", "val_loss", "val_bpb", "step", "tokens_per_s"]
        rows = [[r.get(c, (r.get("summary") or {}).get(c)) for c in cols] for r in runs if isinstance(r, dict)]
        sections.append(("Runs", _table(cols, rows, cls="runs")))
    name = results.get("study") or results.get("name") or study_dir.name
    return f"moekit study report: {name}", f"study folder {study_dir}", sections


def build_report(path: str | Path, *, samples: int = 3, sample_tokens: int = 80) -> str:
    """The HTML page of a run folder or a study folder (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{str(path)!r} is not a folder; give a moekit train --out folder or a moekit compare "
                          f"--out folder")
    if (path / "results.json").is_file():
        title, subtitle, sections = _study_sections(path)
    elif (path / "config.json").is_file():
        title, subtitle, sections = _run_sections(path, samples, sample_tokens)
    else:
        raise ReportError(f"{path} is neither a run folder (no config.json, see moekit train --out) nor a study "
                          f"folder (no results.json, see moekit compare --out)")
    return _page(title, subtitle, sections)


def write_report(path: str | Path, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Write :func:`build_report` to ``out`` (default ``PATH/report.html``) atomically; returns the file."""
    out = Path(out) if out is not None else Path(path) / "report.html"
    text = build_report(path, **kwargs)
    if not out.parent.is_dir():
        raise ReportError(f"cannot write {out}: the folder {out.parent} does not exist; create it or choose "
                          f"another --out")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        raise ReportError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
