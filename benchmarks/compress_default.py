"""Compress a trained run by every method (or the MC-SMoE set): quality, bits per parameter, forward speed.

Quality is bits/byte against expert memory; QMoE's bits per parameter; forward speed is against the float model.

Without ``--run`` it trains a ``--preset`` run (default ``coarse``: 8 experts x 512, top-2, the ``default`` before
issue 20 and the shape of the documented figures) once (``--train-seconds``, default 120 s: a reduced budget for a shared machine; the preset's
own budget is 240 s; the run is reused when the output folder already holds its checkpoint) into ``OUT/default``.
It then runs a sweep (bits/byte on the validation split, expert bytes on disk and resident) and times a forward
pass of a ``[4, context]`` batch, float and compressed alternated (A B A B ...), reporting median ratios.

``--points all`` (the default) sweeps :data:`moekit.compression.runs.SWEEP_POINTS` and times six methods;
``--points mc-smoe`` sweeps MC-SMoE (M-SMoE merging, then low-rank + row-sparse experts) beside M-SMoE alone,
frequency pruning and MC-SMoE without its distillation, at 50% and 25% of the float expert bytes, and times the
``lowrank-sparse`` bank.

    python benchmarks/compress_default.py --out bench_out/compress      # about 10 minutes on 2 busy cores
    python benchmarks/compress_default.py --run RUN --points mc-smoe --out DIR --threads 1 --repeats 7

Writes ``OUT/sweep/sweep.md``, ``sweep.json``, ``sweep.png`` (through :func:`moekit.compression.runs.sweep_run`)
and ``OUT/results.json`` (rows, forward-time ratios, sweep seconds; ``OUT/speed.json`` with ``--speed-only``);
prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench.timing import run_environment
from moekit.cli.main import main as cli
from moekit.compression import compress
from moekit.compression.runs import calibration_tokens, format_table, sweep_run
from moekit.data import load_data
from moekit.training import load_run
from moekit.training.checkpoint import has_checkpoint, write_json

# (sweep points, or None for SWEEP_POINTS; the (method, options) whose forward time is measured)
POINTS: dict[str, tuple[list[tuple[str, dict]] | None, list[tuple[str, dict]]]] = {
    "all": (None, [("rtn", {"bits": 8}), ("rtn", {"bits": 4}), ("gptq", {"bits": 3}), ("qmoe", {"bits": 1.5}),
                   ("d2moe-mwq", {"bits": 2, "levels": 2}), ("m-smoe", {"target_memory": 0.5})]),
    "mc-smoe": ([("prune-frequency", {"target_memory": 0.5}), ("prune-frequency", {"target_memory": 0.25}),
                 ("m-smoe", {"target_memory": 0.5}), ("m-smoe", {"target_memory": 0.25}),
                 ("mc-smoe", {"target_memory": 0.5}), ("mc-smoe", {"target_memory": 0.25}),
                 ("mc-smoe", {"target_memory": 0.5, "lowrank_steps": 0}),
                 ("mc-smoe", {"target_memory": 0.25, "lowrank_steps": 0})],
                [("mc-smoe", {"target_memory": 0.5, "lowrank_steps": 0}),
                 ("mc-smoe", {"target_memory": 0.25, "lowrank_steps": 0})]),
}


def forward_ratio(run_dir: str | Path, method: str, opts: dict, calib: torch.Tensor, repeats: int = 5) -> float:
    """Median of (compressed forward time / float forward time) on a ``[4, context]`` batch, alternating the two."""
    cfg, base, _ = load_run(run_dir, "cpu")
    _, small, _ = load_run(run_dir, "cpu")
    compress(small, method, calib, **opts)
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.context), generator=torch.Generator().manual_seed(0))
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
    p.add_argument("--run", help="compress this trained run folder instead of training OUT/default")
    p.add_argument("--preset", default="coarse", help="the preset trained into OUT/default when --run is not given")
    p.add_argument("--points", choices=sorted(POINTS), default="all", help="which sweep and speed methods")
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5, help="alternations per forward-time ratio")
    p.add_argument("--threads", type=int, help="torch threads for the forward timings (default: torch's)")
    p.add_argument("--speed-only", action="store_true", help="only the forward-speed ratios (reuses the run)")
    args = p.parse_args()
    out = Path(args.out)
    run_dir = Path(args.run) if args.run else out / "default"
    if not args.run and not has_checkpoint(run_dir):
        assert cli(["train", "--preset", args.preset, "--out", str(run_dir), "--no-progress",
                    f"--train.max_seconds={args.train_seconds}", "--train.threads=2"]) == 0
    sweep_points, speed_points = POINTS[args.points]
    rows, sweep_s = [], 0.0
    if not args.speed_only:
        t0 = time.perf_counter()
        rows = sweep_run(run_dir, out / "sweep", points=sweep_points, num_tokens=args.calibration_tokens)
        sweep_s = time.perf_counter() - t0
        print(format_table(rows))
    cfg, _, _ = load_run(run_dir, "cpu")
    calib = calibration_tokens(cfg, load_data(cfg.data), args.calibration_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    speed = {}
    for method, opts in speed_points:
        speed[f"{method} {opts}"] = forward_ratio(run_dir, method, opts, calib, args.repeats)
        print(f"forward time {method} {opts} / float: {speed[f'{method} {opts}']:.2f}x (median of {args.repeats}, "
              f"alternated)")
    name = "speed.json" if args.speed_only else "results.json"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / name, {"environment": run_environment("cpu"), "rows": rows, "forward_time_ratio": speed,
                            "sweep_seconds": sweep_s})


if __name__ == "__main__":
    main()
