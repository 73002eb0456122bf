"""Profile and time the whole training step of two presets (default: ``default`` vs ``dense``), issue 20.

    python benchmarks/profile_step.py [--presets default dense] [--repeats 8] [--profile-steps 3] [--threads 1]
        [--set train.batch_size=8 ...] [--out docs/bench/step.json]

Prints the step-time ratio (A B A B alternation, medians; ``moekit.bench.step.compare_steps``) and, per preset,
where the operator time goes (``moekit.bench.step.profile_step``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from moekit.bench.step import StepHarness, compare_steps, format_profile, profile_step
from moekit.bench.timing import run_environment
from moekit.recipes import load_preset
from moekit.runtime import tune_cpu_allocator
from moekit.training.config import with_overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["default", "dense"],
                   help="presets, each optionally with overrides: default:train.fused_optimizer=false")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="overrides KEY=VALUE for every preset")
    p.add_argument("--out", default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: CPU seconds (steadier on a shared machine; see moekit.bench.timing)")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = value
    harnesses = {}
    for spec in args.presets:  # "preset" or "preset:key=value,key=value" (e.g. default:train.fused_optimizer=false)
        name, _, extra = spec.partition(":")
        arm = dict(overrides, **dict(kv.split("=", 1) for kv in extra.split(",") if kv))
        harnesses[spec] = StepHarness.build(with_overrides(load_preset(name), arm))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "threads": args.threads, "load_before": load, "environment": run_environment("cpu"),
              "overrides": overrides,
              "timing": compare_steps(harnesses, repeats=args.repeats, clock=args.clock),
              "clock": args.clock}
    for name, r in result["timing"].items():
        print(f"{name:<40} step {r['step_s'] * 1e3:8.1f} ms  {r['tokens_per_s']:8.0f} tokens/s  "
              f"x{r['tokens_per_s_ratio']:.3f} of {args.presets[0]}'s tokens/s"
              f"  (per round q1-q3 {r['tokens_per_s_ratio_quartiles'][0]:.3f}"
              f"-{r['tokens_per_s_ratio_quartiles'][2]:.3f})")
    if args.profile_steps:
        result["profiles"] = {}
        for name, h in harnesses.items():
            prof = profile_step(h, steps=args.profile_steps)
            result["profiles"][name] = prof
            print(format_profile(name, prof))
    result["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average (1 min) before {load}, after {result['load_after']}")
    if args.out:
        from moekit.training.checkpoint import write_json
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
