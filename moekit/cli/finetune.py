"""``moekit finetune RUN|--hf PATH --method NAME --out DIR``: train only adapters on a frozen model (a trained run's,
or a local transformers causal LM folder's)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a trained run with adapters (LoRA, MixLoRA, ...) on new data",
        description="Freeze a trained run's model, inject adapters and train only them with the ordinary trainer. "
        "The new run folder reads with moekit eval / moekit sample like any other.",
        epilog="Method options as --adapter.key=value (e.g. --adapter.rank=8 --adapter.num_experts=4); training "
        "and data as --train.key=value / --data.key=value, e.g. --data.source=multitask --train.max_steps=200. "
        "With --hf PATH (a transformers causal-LM folder written by save_pretrained) the training and data "
        "settings start from the dense preset, --model.context sets the window, and the folder's tokenizer is "
        "used when it has one (byte ids otherwise, which need vocab_size >= 256).")
    p.add_argument("run", metavar="RUN", nargs="?", help="the base run folder (written by moekit train)")
    p.add_argument("--hf", metavar="PATH", help="fine-tune a local transformers causal-LM folder instead of a run")
    p.add_argument("--method", help="adapter method (see --list)")
    p.add_argument("--targets", help="comma-separated module names, suffixes or globs (default: the method's own)")
    p.add_argument("--companion", metavar="METHOD", help="a second method on other modules, e.g. lora beside "
                   "mixlora (options as --companion.key=value)")
    p.add_argument("--companion-targets", metavar="LIST", help="the companion's comma-separated targets (default: "
                   "its own)")
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
    if args.run and args.hf:
        raise UsageError(f"give either RUN ({args.run}) or --hf PATH ({args.hf}), not both")
    missing = [name for name, value in (("RUN or --hf PATH", args.run or args.hf), ("--method", args.method),
                                        ("--out", args.out)) if not value]
    if missing:
        raise UsageError(f"finetune needs {', '.join(missing)}: moekit finetune RUN|--hf PATH --method NAME --out DIR "
                         f"(methods: moekit finetune --list)")
    for given in (args.method, args.companion):
        if given is not None and given not in adapters.available():
            raise UsageError(f"unknown adapter method {given!r}; choose one of {adapters.available()}")
    from ..adapters.finetune import finetune
    from ..adapters.hf_finetune import finetune_hf
    overrides = dict(args.overrides or {})
    options = {k[len("adapter."):]: overrides.pop(k) for k in list(overrides) if k.startswith("adapter.")}
    companion_options = {k[len("companion."):]: overrides.pop(k) for k in list(overrides)
                         if k.startswith("companion.")}
    if (companion_options or args.companion_targets) and not args.companion:
        raise UsageError("--companion.* options and --companion-targets need --companion METHOD")
    targets = [t for t in args.targets.split(",") if t] if args.targets else None
    companion_targets = [t for t in args.companion_targets.split(",") if t] if args.companion_targets else None
    companions = [(args.companion, companion_targets, companion_options)] if args.companion else None
    result = (finetune_hf if args.hf else finetune)(args.hf or args.run, args.out, args.method, targets=targets,
                                                    options=options, overrides=overrides, resume=args.resume,
                                                    progress=not args.no_progress, companions=companions)
    print(f"{result.method}: {result.trainable_params:,} trainable parameters; adapters in {result.adapter_file}")
    return 0
