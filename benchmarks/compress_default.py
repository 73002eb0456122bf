"""Compress a trained ``coarse``-preset run (the ``default`` before issue 20: 8 experts x 512, top-2) with every
method and baseline: quality vs expert memory, QMoE's
bits per parameter, and forward speed vs the float model.

Trains the run once (``--train-seconds``, default 120 s: a reduced budget for a shared machine; the preset's own
budget is 240 s; the run is reused when the output folder already holds it), then runs the sweep of :data:`moekit.compression.runs.SWEEP_POINTS` (bits/byte on the
validation split, expert bytes on disk and resident) and times a forward pass of a ``[4, 256]`` batch, float and
compressed alternated (A B A B ...), reporting median ratios.

    python benchmarks/compress_default.py --out bench_out/compress      # about 10 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.cli.main import main as cli
from moekit.compression import compress
from moekit.compression.runs import calibration_tokens, format_table, sweep_run
from moekit.data import load_data
from moekit.training import load_run


def forward_ratio(run_dir: Path, method: str, opts: dict, calib: torch.Tensor, repeats: int = 5) -> float:
    """Median of (compressed forward time / float forward time), alternating the two."""
    _, base, _ = load_run(run_dir, "cpu")
    _, small, _ = load_run(run_dir, "cpu")
    compress(small, method, calib, **opts)
    x = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.no_grad():
        base(x), small(x)  # warm up
        for _ in range(repeats):
            t0 = time.perf_counter()
            base(x)
            t1 = time.perf_counter()
            small(x)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/compress")
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--speed-only", action="store_true", help="only the forward-speed ratios (reuses the run)")
    args = p.parse_args()
    out = Path(args.out)
    run_dir = out / "default"
    if not (run_dir / "state.json").exists():
        assert cli(["train", "--preset", "coarse", "--out", str(run_dir), "--no-progress",
                    f"--train.max_seconds={args.train_seconds}",
                    "--train.threads=2"]) == 0
    rows, sweep_s = [], 0.0
    if not args.speed_only:
        t0 = time.perf_counter()
        rows = sweep_run(run_dir, out / "sweep", num_tokens=args.calibration_tokens)
        sweep_s = time.perf_counter() - t0
        print(format_table(rows))
    cfg, _, _ = load_run(run_dir, "cpu")
    calib = calibration_tokens(cfg, load_data(cfg.data), args.calibration_tokens)
    speed = {}
    for method, opts in (("rtn", {"bits": 8}), ("rtn", {"bits": 4}), ("gptq", {"bits": 3}), ("qmoe", {"bits": 1.5}),
                         ("d2moe-mwq", {"bits": 2, "levels": 2}), ("m-smoe", {"target_memory": 0.5})):
        speed[f"{method} {opts}"] = forward_ratio(run_dir, method, opts, calib)
        print(f"forward time {method} {opts} / float: {speed[f'{method} {opts}']:.2f}x (median of 5, alternated)")
    name = "speed.json" if args.speed_only else "results.json"
    (out / name).write_text(json.dumps({"rows": rows, "forward_time_ratio": speed, "sweep_seconds": sweep_s},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
