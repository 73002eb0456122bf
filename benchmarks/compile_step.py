"""Compiled vs eager training step of a preset (issue 20), in one run: A B A B alternation, medians.

    python benchmarks/compile_step.py [--preset default] [--repeats 6] [--threads 1] [--backend inductor]
        [--clock wall|cpu] [--regional] [--out docs/bench/compile_step.json]

The compiled arm is ``torch.compile(model)`` of the same weights (``engine="auto"`` then runs the
compile-friendly ``sorted_op`` custom op, no graph break inside the MoE layers); the optimizer step, clipping
and the rest of :func:`moekit.training.trainer.train_step` stay eager. Prints the compile time (first step)
and the steady-state step-time ratio. ``--regional`` compiles only the parts without data-dependent shapes
(every block's attention and its two norms, the shared experts or a dense FFN, the final norm: ``module.compile()``
in place) and leaves the routed experts eager on their usual engine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moekit.bench.step import StepHarness, compare_steps
from moekit.bench.timing import run_environment
from moekit.recipes import load_preset
from moekit.runtime import tune_cpu_allocator
from moekit.training.runfiles import write_json


def _compile_regions(model: torch.nn.Module, backend: str) -> None:
    """Compile in place the modules of ``model`` that hold no MoE routing: attention, norms, dense FFNs (the
    shared experts included); routed expert banks and routers stay eager."""
    from moekit.experts import FeedForward
    from moekit.models.attention import Attention

    for module in model.modules():
        if isinstance(module, Attention | FeedForward | torch.nn.RMSNorm | torch.nn.LayerNorm):
            module.compile(backend=backend)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="default")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--regional", action="store_true",
                   help="compile attention, norms and shared/dense FFNs only; the routed experts stay eager")
    p.add_argument("--out", default=None, help="write the figures as JSON (with date, machine and torch version)")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    cfg = load_preset(args.preset)
    eager = StepHarness.build(cfg)
    compiled = StepHarness.build(cfg)
    if args.regional:
        _compile_regions(compiled.model, args.backend)
    else:
        compiled.model = torch.compile(compiled.model, backend=args.backend)  # same parameters, optimizer unchanged
    t0 = time.perf_counter()
    compiled(False), compiled(True)  # both variants of the step (with and without statistics)
    compile_s = time.perf_counter() - t0
    print(f"compile (first two steps): {compile_s:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    arm = f"compiled-{args.backend}" + ("-regional" if args.regional else "")
    out = compare_steps({"eager": eager, arm: compiled}, repeats=args.repeats,
                        clock=args.clock)
    for name, r in out.items():
        print(f"{name:<20} step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:8.0f} tokens/s  "
              f"x{r['tokens_per_s_ratio']:.3f} of eager"
              f"  (per round q1-q3 {r['tokens_per_s_ratio_quartiles'][0]:.3f}"
              f"-{r['tokens_per_s_ratio_quartiles'][2]:.3f})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.out:
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                  "preset": args.preset, "threads": args.threads, "backend": args.backend,
                  "regional": args.regional, "clock": args.clock,
                  "repeats": args.repeats, "environment": run_environment("cpu"),
                  "compile_s_first_two_steps": compile_s, "timing": out,
                  "load_after": os.getloadavg()[0]}
        write_json(Path(args.out), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
