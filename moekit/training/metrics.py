"""Run bookkeeping: per-step metrics as JSON lines, progress with an ETA, the matmul peak and the summary table.

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
from typing import Any, TextIO

import torch

__all__ = ["MetricsLog", "Progress", "TensorBoardLog", "budget_status", "format_duration", "measure_matmul_peak",
           "read_metrics", "summary_table"]

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


class TensorBoardLog:
    """Every metrics record also as TensorBoard scalars (``train/loss``, ``val/val_bpb``, ...), and per-layer
    routing statistics as ``routing/<layer>/<statistic>``, in ``log_dir`` (``tensorboard --logdir DIR``).

    Uses ``torch.utils.tensorboard``, which needs the ``tensorboard`` package (``pip install moekit[tensorboard]``).
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from ..configs import ConfigError
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'moekit[tensorboard]' "
                              "(or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        group = "val" if any(k.startswith("val_") for k in record) else "train"
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def write_layers(self, step: int, layers: dict[str, dict]) -> None:
        for layer, row in layers.items():
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"routing/{layer}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


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


def format_duration(seconds: float | None) -> str:
    """``75 -> '1:15'``, ``3725 -> '1:02:05'``; ``None`` (not known yet) -> ``'?'``."""
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "?"
    s = max(0, round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def budget_status(step: int, elapsed: float, max_steps: int, max_seconds: float | None, *, start_step: int = 0,
                  start_elapsed: float = 0.0) -> tuple[float, float | None, str]:
    """``(fraction done, seconds to go, governing budget)`` of a run with a step and an optional time budget.

    The run ends at whichever budget is reached first, so the governing budget is the one further along.
    Seconds to go: for steps, the remaining steps at the mean time per step since ``(start_step,
    start_elapsed)`` (this session: a resumed run's earlier pace is not this machine's now), ``None`` before
    the first step; for time, ``max_seconds - elapsed``; the smaller of the two when both apply.
    """
    step_frac = step / max_steps
    time_frac = elapsed / max_seconds if max_seconds else 0.0
    governs = "time" if time_frac > step_frac else "steps"
    etas = []
    if step > start_step:
        etas.append((max_steps - step) * (elapsed - start_elapsed) / (step - start_step))
    if max_seconds:
        etas.append(max(0.0, max_seconds - elapsed))
    return min(1.0, max(step_frac, time_frac)), (min(etas) if etas else None), governs


class Progress:
    """Progress with an ETA: a tqdm bar on a terminal (when tqdm is installed), else a line every ``every_s``.

    ``update(done, fields)`` reports ``done`` of ``total`` units; the ETA is the remaining units at the mean
    rate since the first update's ``initial``. A caller that knows better (a run under a time budget) passes
    ``fraction``, ``eta`` and ``label`` itself (see :func:`budget_status`).
    """

    def __init__(self, total: float, initial: float = 0, enabled: bool = True, *, unit: str = "step",
                 every_s: float = 10.0, stream: TextIO | None = None, desc: str = "") -> None:
        self.total, self.initial, self.unit, self.every_s, self.desc = total, initial, unit, every_s, desc
        self.stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        self.enabled, self._last, self._t0 = enabled, -math.inf, time.monotonic()
        self.last_line = ""
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=1000, initial=0, dynamic_ncols=True, file=self.stream, disable=None,
                            bar_format="{desc}{percentage:3.0f}%|{bar}| {postfix}", desc=desc)
        except ImportError:
            pass

    def restart_clock(self) -> None:
        """Elapsed time and the ETA's rate count from now (from ``initial`` units done)."""
        self._t0 = time.monotonic()

    def _on_terminal(self) -> bool:
        return self.bar is not None and not self.bar.disable

    def update(self, done: float, fields: dict[str, str] | None = None, force: bool = False, *,
               fraction: float | None = None, eta: float | None = None, label: str | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._t0
        if fraction is None:
            fraction = min(1.0, done / self.total) if self.total else 1.0
            eta = (self.total - done) * elapsed / (done - self.initial) if done > self.initial else None
        if label is None:
            label = f"{self.unit} {done:,.0f}/{self.total:,.0f}"
        parts = [label, f"{format_duration(elapsed)} elapsed", f"ETA {format_duration(eta)}"]
        parts += [f"{k} {v}" for k, v in (fields or {}).items()]
        self.last_line = " · ".join(parts)
        if self._on_terminal():
            self.bar.n = round(fraction * 1000)
            self.bar.set_postfix_str(self.last_line, refresh=False)
            self.bar.refresh()
        elif force or time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            print(f"{self.desc}{fraction:4.0%} " + self.last_line, file=self.stream, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._on_terminal():
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, float) and abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:,.0f}"


def _rate(summary: dict) -> str | float | None:
    """Tokens/s, with what the config expects on the reference machine when it says (a busy machine shows)."""
    rate, expected = summary.get("tokens_per_s"), summary.get("expected_tokens_per_s")
    if rate is None or not expected:
        return rate
    return f"{_fmt(rate)} (expected {expected:,.0f} on 2 idle CPU cores)"


def summary_table(summary: dict) -> str:
    """The end-of-run table: headline figures, then one row per MoE layer (load CV, dead experts)."""
    rows = [("validation loss", summary.get("val_loss")), ("validation bits/byte", summary.get("val_bpb")),
            ("steps", summary.get("step")), ("tokens", summary.get("tokens")),
            ("tokens/s", _rate(summary)), ("MFU", f"{summary.get('mfu', 0.0):.2%}"),
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
