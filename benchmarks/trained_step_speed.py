"""Training-step speed of trained runs, alternated (A B A B ..., medians and per-round quartiles), issue 20.

    python benchmarks/trained_step_speed.py NAME=RUN_DIR NAME=RUN_DIR ... [--repeats 20] [--threads 1]
        [--clock cpu|wall] [--no-progress] [--out docs/results/trained_step_speed.json]

Each ``RUN_DIR`` is a ``moekit train`` (or ``moekit compare``) run folder: its model is built from its
``config.json`` and loaded from its latest checkpoint (weights and optimizer), then every run trains on, step by
step in turn, in this one process (``moekit.bench.step.compare_steps``). A router's speed depends on what it has
learned (top-p's experts per token fall during training), so this times trained routers rather than fresh ones.
Ratios are to the first run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moekit.bench.step import StepHarness, compare_steps
from moekit.bench.timing import run_environment
from moekit.runtime import tune_cpu_allocator
from moekit.training.checkpoint import load_checkpoint
from moekit.training.config import run_config_from_dict
from moekit.training.metrics import Progress
from moekit.training.runfiles import write_json


def _run(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not (Path(folder) / "config.json").is_file():
        raise SystemExit(f"trained_step_speed: expected NAME=RUN_DIR with RUN_DIR/config.json, got {spec!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR, at least two")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    runs = dict(_run(spec) for spec in args.runs)
    if len(runs) < 2:
        p.error("give at least two runs to compare")
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    harnesses = {}
    for name, folder in runs.items():
        h = StepHarness.build(run_config_from_dict(json.loads((folder / "config.json").read_text())))
        load_checkpoint(folder, h.model, h.optimizer)
        harnesses[name] = h
    rounds = args.repeats + 2  # compare_steps' two warm-up rounds included
    bar = Progress(rounds, 0, enabled=not args.no_progress, unit="round", desc="steps ")
    done = [0]

    def tick() -> None:
        done[0] += 1
        bar.update(done[0])

    try:
        out = compare_steps(harnesses, repeats=args.repeats, clock=args.clock, tick=tick)
    finally:
        bar.close()
    first = next(iter(runs))
    for name, r in out.items():
        q = r["tokens_per_s_ratio_quartiles"]
        print(f"{name:<12} step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:8.0f} tokens/s  "
              f"x{r['tokens_per_s_ratio']:.3f} of {first}'s  (per round q1-q3 {q[0]:.3f}-{q[2]:.3f})")
    if args.out:
        write_json(Path(args.out), {"environment": run_environment("cpu"), "threads": args.threads,
                                    "clock": args.clock, "repeats": args.repeats,
                                    "runs": {n: str(f) for n, f in runs.items()}, "timing": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
