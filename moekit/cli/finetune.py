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
    p.add_argument("--loop", choices=("sema", "mome"), help="run a whole-model loop instead of the trainer: sema "
                   "(continual: --tasks arrive in order, --train.max_steps each) or mome (multi-scale: the run's "
                   "data at --rates)")
    p.add_argument("--tasks", metavar="LIST", help="--loop sema: comma-separated tasks in order, from add, mul, "
                   "copy, sort, data (the run's own data)")
    p.add_argument("--rates", metavar="LIST", help="--loop mome: comma-separated pooling rates dividing the "
                   "context (default 1,2,4)")
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
    if args.loop or args.tasks or args.rates:
        return _run_loop(args)
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


def _run_loop(args: argparse.Namespace) -> int:
    """``--loop sema|mome``: the argument checks, then :func:`moekit.adapters.loop_finetune.loop_finetune`."""
    from ..adapters.loop_finetune import loop_finetune
    from .main import UsageError
    if not args.loop:
        raise UsageError(f"{'--tasks' if args.tasks else '--rates'} needs --loop "
                         f"{'sema' if args.tasks else 'mome'}")
    given = [flag for flag, value in (("--hf", args.hf), ("--companion", args.companion), ("--resume", args.resume))
             if value]
    if given:
        raise UsageError(f"--loop {args.loop} runs on a moekit run folder without {', '.join(given)}; remove "
                         f"{'it' if len(given) == 1 else 'them'}")
    if args.method is not None and args.method != args.loop:
        raise UsageError(f"--loop {args.loop} trains {args.loop} adapters, not --method {args.method}; drop --method")
    missing = [name for name, value in (("RUN", args.run), ("--out", args.out)) if not value]
    if missing:
        raise UsageError(f"--loop needs {' and '.join(missing)}: moekit finetune RUN --loop sema|mome --out DIR")
    if args.tasks and args.loop != "sema" or args.rates and args.loop != "mome":
        raise UsageError(f"{'--tasks' if args.tasks else '--rates'} is for --loop "
                         f"{'sema' if args.tasks else 'mome'}, not --loop {args.loop}")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    try:
        rates = [int(r) for r in args.rates.split(",") if r] if args.rates else None
    except ValueError:
        raise UsageError(f"--rates {args.rates!r} must be comma-separated integers, e.g. 1,2,4") from None
    overrides = dict(args.overrides or {})
    options = {k[len("adapter."):]: overrides.pop(k) for k in list(overrides) if k.startswith("adapter.")}
    targets = [t for t in args.targets.split(",") if t] if args.targets else None
    result = loop_finetune(args.run, args.out, args.loop, tasks=tasks, rates=rates, targets=targets,
                           options=options, overrides=overrides)
    if args.loop == "sema":
        for r in result.report:
            grew = f"{len(r['expanded'])} layers expanded" if r["expanded"] else "no expansion"
            loss = "nothing trained" if r["first_loss"] is None else f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}"
            print(f"task {r['task']} ({r['name']}): {grew}, {r['trainable']:,} trainable, {loss}")
    else:
        first, last = result.report[0], result.report[-1]
        print(f"mome: loss {first['loss']:.3f} -> {last['loss']:.3f} over {len(result.report)} steps")
    print(f"{result.method}: {result.trainable_params:,} trainable parameters; adapters in {result.adapter_file}")
    return 0
