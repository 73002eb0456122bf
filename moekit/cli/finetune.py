"""``moekit finetune RUN --method NAME --out DIR``: train only adapters on a trained run's frozen model."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a trained run with adapters (LoRA, MixLoRA, ...) on new data",
        description="Freeze a trained run's model, inject adapters and train only them with the ordinary trainer. "
        "The new run folder reads with moekit eval / moekit sample like any other.",
        epilog="Method options as --adapter.key=value (e.g. --adapter.rank=8 --adapter.num_experts=4); training "
        "and data as --train.key=value / --data.key=value, e.g. --data.source=multitask --train.max_steps=200.")
    p.add_argument("run", metavar="RUN", nargs="?", help="the base run folder (written by moekit train)")
    p.add_argument("--method", help="adapter method (see --list)")
    p.add_argument("--targets", help="comma-separated module names, suffixes or globs (default: the method's own)")
    p.add_argument("--out", metavar="DIR", help="the fine-tuning run folder")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--list", action="store_true", help="print the adapter methods and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary table")
    p.set_defaults(func=run, overrides=True)


def run(args: argparse.Namespace) -> int:
    from .. import adapters
    from .main import UsageError
    if args.list:
        print("\n".join(adapters.available()))
        return 0
    missing = [name for name, value in (("RUN", args.run), ("--method", args.method), ("--out", args.out))
               if not value]
    if missing:
        raise UsageError(f"finetune needs {', '.join(missing)}: moekit finetune RUN --method NAME --out DIR "
                         f"(methods: moekit finetune --list)")
    from ..adapters.finetune import finetune
    overrides = dict(args.overrides or {})
    options = {k[len("adapter."):]: overrides.pop(k) for k in list(overrides) if k.startswith("adapter.")}
    targets = [t for t in args.targets.split(",") if t] if args.targets else None
    result = finetune(args.run, args.out, args.method, targets=targets, options=options, overrides=overrides,
                      resume=args.resume, progress=not args.no_progress)
    print(f"{result.method}: {result.trainable_params:,} trainable parameters; adapters in {result.adapter_file}")
    return 0
