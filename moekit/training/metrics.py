"""Run bookkeeping: per-step metrics as JSON lines, a progress line, the matmul peak and the summary table.

Model FLOPs utilisation (MFU, PaLM arXiv 2204.02311 app. B) = ``flops_per_token * tokens_per_s / peak``, with
``flops_per_token`` from :func:`moekit.models.count` and ``peak`` the float32 matmul rate measured once at
the start of a run on the same device (not a datasheet figure, so the ratio says how much of what this
machine can do the model actually uses).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["MetricsLog", "Progress", "measure_matmul_peak", "summary_table", "read_metrics"]

_PEAK_CACHE: dict[str, float] = {}


def measure_matmul_peak(device: torch.device | str = "cpu", size: int = 1024, seconds: float = 0.3) -> float:
    """Best observed float32 matmul rate in FLOP/s (measured once per device and process)."""
    key = str(device)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    gen = torch.Generator(device=device).manual_seed(0)  # own generator: the global RNG stays untouched
    a = torch.randn(size, size, generator=gen, device=device)
    b = torch.randn(size, size, generator=gen, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    _PEAK_CACHE[key] = best
    return best


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops lines past the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        from .checkpoint import write_atomic
        self.path = Path(path)
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        # A fresh file replaces whatever is there (a planted symlink included), and is then appended to
        # without following links.
        write_atomic(self.path, lambda tmp: tmp.write_text(text))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
        self._file = os.fdopen(fd, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, from a crash, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):  # anything else is not a record of ours
            out.append(record)
    return out


class Progress:
    """A tqdm bar when tqdm is installed and the output is a terminal, else a printed line now and then."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar, self.enabled, self._last = None, enabled, 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            disable=None)
        except ImportError:
            pass

    def update(self, step: int, fields: dict[str, str], force: bool = False) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.n = step
            self.bar.set_postfix(fields, refresh=False)
            self.bar.refresh()
        elif force or time.monotonic() - self._last > 10:
            self._last = time.monotonic()
            print(f"step {step} " + " ".join(f"{k} {v}" for k, v in fields.items()), file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, float) and abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:,.0f}"


def summary_table(summary: dict) -> str:
    """The end-of-run table: headline figures, then one row per MoE layer (load CV, dead experts)."""
    rows = [("validation loss", summary.get("val_loss")), ("validation bits/byte", summary.get("val_bpb")),
            ("steps", summary.get("step")), ("tokens", summary.get("tokens")),
            ("tokens/s", summary.get("tokens_per_s")), ("MFU", f"{summary.get('mfu', 0.0):.2%}"),
            ("matmul peak GFLOP/s", summary.get("peak_flops", 0) / 1e9),
            ("wall time s", summary.get("wall_time_s")),
            ("params (active)", f"{summary.get('total_params', 0):,} ({summary.get('active_params', 0):,})")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v if isinstance(v, str) else _fmt(v) if v is not None else '-'}" for k, v in rows]
    layers = summary.get("layers") or {}
    if layers:
        name_w = max(len("layer"), *(len(n) for n in layers))
        lines.append("")
        lines.append(f"{'layer'.ljust(name_w)}  {'load CV':>8}  {'max/mean':>8}  {'dead experts':>12}")
        standard = {"tokens", "load_cv", "max_over_mean", "load_entropy", "token_entropy", "dead_experts",
                    "drop_rate", "bias_drift"}
        for name, row in layers.items():
            extra = ", ".join(f"{k}={_fmt(float(v))}" for k, v in sorted(row.items()) if k not in standard)
            lines.append(f"{name.ljust(name_w)}  {row['load_cv']:>8.3f}  {row['max_over_mean']:>8.2f}  "
                         f"{int(row['dead_experts']):>12d}" + (f"  {extra}" if extra else ""))
    return "\n".join(lines)
