"""``moekit analyze``: run text through an MoE model and report its routing (table, JSON and PNG plots).

Copy-paste examples (CPU)::

    # a run folder written by `moekit train`: writes into runs/tiny/analysis/
    moekit analyze runs/tiny --stdlib 400
    # a random tiny model of any supported transformers architecture (no download)
    moekit analyze --tiny mixtral --stdlib 200 --out runs/analyze-tiny
    # a transformers checkpoint folder on disk (loaded offline, MoE blocks patched by moekit)
    moekit analyze --hf /path/to/OLMoE-1B-7B --text notes.txt --out runs/analyze-olmoe
    # any model a Python function builds: fn() -> model or (model, tokenizer)
    moekit analyze --model mypkg.models:build --stdlib 400

On one GPU add ``--device cuda`` (``auto``, the default, uses it when there is one). Writes ``table.txt``,
``tokens.txt``, ``report.json`` and ``load.png``, ``coactivation.png``, ``entropy.png`` into ``--out``: by
default ``RUN/analysis`` for a run folder, else ``runs/analyze/<model>-<date>-<time>`` (a new folder each
time, so no analysis overwrites another).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

__all__ = ["build_parser", "main", "register", "run"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (choose one)").add_mutually_exclusive_group(required=True)
    src.add_argument("run", nargs="?", metavar="RUN", help="a run folder written by moekit train")
    src.add_argument("--hf", metavar="PATH", help="a transformers model folder (offline); its MoE blocks are patched")
    src.add_argument("--tiny", metavar="ARCH", help="a random tiny transformers model: mixtral, qwen2_moe, "
                     "qwen3_moe, olmoe, deepseek_v3, gpt_oss")
    src.add_argument("--model", metavar="MODULE:FN", help="a function returning a model or (model, tokenizer)")
    txt = p.add_argument_group("text")
    txt.add_argument("--text", metavar="FILE", action="append", default=[],
                     help="text file, one passage per non-empty line (repeatable); default: stdlib docstrings")
    txt.add_argument("--stdlib", type=int, default=400, metavar="N",
                     help="number of standard-library docstring sentences when no --text is given (default 400)")
    run_g = p.add_argument_group("run")
    run_g.add_argument("--out", metavar="DIR", help="output folder (default: RUN/analysis for a run folder, else "
                       "runs/analyze/<model>-<date>-<time>)")
    run_g.add_argument("--engine", default="auto", help="moekit engine for patched blocks (default auto)")
    run_g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where to run; auto: CUDA when available")
    run_g.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's)")
    run_g.add_argument("--no-progress", action="store_true", help="no progress display")
    run_g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    run_g.add_argument("--max-length", type=int, default=128, help="tokens kept per passage (default 128)")
    run_g.add_argument("--per-expert", type=int, default=5, help="tokens listed per expert (default 5)")
    run_g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def build_parser() -> argparse.ArgumentParser:
    from .common import HelpFormatter
    p = argparse.ArgumentParser(prog="moekit analyze", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    _add_arguments(p)
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``analyze`` sub-command to a ``moekit`` argument parser's subparsers."""
    p = subparsers.add_parser("analyze", help="routing analysis of an MoE model (table, JSON, PNG plots)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _load_model(args):
    import moekit.hf as mh

    if args.run:
        from moekit.data import get_tokenizer
        from moekit.training import load_run

        cfg, model, _ = load_run(args.run, args.device)
        return model, get_tokenizer(cfg.data.tokenizer)
    if args.tiny:
        from moekit.hf.tiny import tiny_model

        return mh.patch(tiny_model(args.tiny, vocab_size=256, num_layers=4), engine=args.engine), None
    if args.hf:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
        return mh.patch(model, engine=args.engine), tokenizer
    module, _, fn = args.model.partition(":")
    if not fn:
        raise SystemExit(f"--model expects MODULE:FUNCTION, got {args.model!r}")
    built = getattr(importlib.import_module(module), fn)()
    model, tokenizer = built if isinstance(built, tuple) else (built, None)
    if not any(type(m).__name__ == "MoE" for m in model.modules()):
        model = mh.patch(model, engine=args.engine)
    return model, tokenizer


def _texts(args) -> list[str]:
    if args.text:
        lines = []
        for path in args.text:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                from .main import UsageError
                raise UsageError(f"--text {path} is not valid UTF-8 ({e.reason} at byte {e.start}); convert it "
                                 f"to UTF-8 (e.g. iconv -t UTF-8)") from None
            lines += [line.strip() for line in text.splitlines() if line.strip()]
        return lines
    from moekit.analysis import stdlib_sentences

    return stdlib_sentences(args.stdlib)


def _write_atomic(path: Path, text: str) -> None:
    import os
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _out_dir(args) -> Path:
    if args.out:
        return Path(args.out)
    if args.run:
        return Path(args.run) / "analysis"
    import time
    name = args.tiny or (Path(args.hf).name if args.hf else args.model.replace(":", "-").replace(".", "-"))
    return Path("runs") / "analyze" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_writable(out: Path) -> None:
    """Refuse an output location that cannot be written, without creating anything."""
    from .main import UsageError
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the analysis into {out} ({existing} is not writable); choose a writable --out")


def run(args: argparse.Namespace) -> int:
    from moekit.analysis import analyze, save_plots
    from moekit.cli.common import apply_threads

    apply_threads(args.threads)
    model, tokenizer = _load_model(args)  # first: a folder of the wrong kind fails before anything is written
    texts = _texts(args)  # bad text files fail here, before anything is written
    if not texts:
        raise SystemExit("no text to analyse: the --text files are empty")
    out = _out_dir(args)
    _check_writable(out)  # before the analysis: an unwritable folder fails at once, not after minutes of work
    model.to(_device(args.device))
    from moekit.training.metrics import Progress
    bar = Progress(len(texts), 0, enabled=not args.no_progress, unit="passage", desc="analyze ")
    try:
        report = analyze(model, texts, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                         per_expert=args.per_expert, progress=lambda done, total: bar.update(done, force=done == total))
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    table, tokens = report.table(), report.token_table(args.per_expert)
    for name, text in (("table.txt", table + "\n"), ("tokens.txt", tokens + "\n"),
                       ("report.json", json.dumps(report.to_dict(), indent=1))):
        _write_atomic(out / name, text)
    print(table)
    print()
    print(tokens)
    if not args.no_plots:
        for path in save_plots(report, out):
            print(f"wrote {path}")
    print(f"wrote {out / 'table.txt'}, {out / 'tokens.txt'}, {out / 'report.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
