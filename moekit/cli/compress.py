"""``moekit compress``: merge, prune or quantise the experts of a trained run.

Examples::

    moekit compress --list
    moekit compress runs/default --method m-smoe --target-memory 0.5 --out runs/default-msmoe
    moekit compress runs/default --method qmoe --bits 1.5 --out runs/default-qmoe
    moekit compress runs/default --method mc-smoe --target-memory 0.25 --out runs/default-mcsmoe
    moekit compress runs/default --sweep --out runs/default-sweep
    moekit compress runs/dense --method mote --steps 100 --out runs/dense-mote
    moekit compress runs/default --method eaquant --bits 4 --act-bits 4 --rotate --out runs/default-w4a4
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("compress", help="merge, prune or quantise a run's experts into a new run folder")
    p.add_argument("run", metavar="RUN", nargs="?", help="a run folder written by moekit train")
    p.add_argument("--list", action="store_true", help="print the method names, one per line")
    p.add_argument("--method", help="the compression method (see --list)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-memory", type=float, help="fraction of the float expert bytes to keep, e.g. 0.5")
    target.add_argument("--bits", type=float, help="bits per weight for quantisers (qmoe: 1.5 = ternary)")
    target.add_argument("--keep-experts", type=int, help="experts (or merged groups) kept per layer")
    p.add_argument("--out", help="the new run folder (written only when the whole compression succeeded)")
    p.add_argument("--sweep", action="store_true", help="every method at 2-3 operating points: table and plot")
    p.add_argument("--calibration-tokens", type=int, default=4096, help="tokens of the training split to calibrate on")
    p.add_argument("--rank", type=int, help="mc-smoe: rank of the low-rank part (default: solved from "
                   "--target-memory, else 32)")
    p.add_argument("--final-threshold", type=float,
                   help="mc-smoe: kept fraction of the sparse part's rows (default: 0.10, MC-SMoE's README)")
    p.add_argument("--no-codec", action="store_true", help="qmoe: keep ternary codes packed, not entropy-coded")
    p.add_argument("--steps", type=int, help="mote: quantisation-aware training steps (default 50)")
    p.add_argument("--act-bits", type=int, help="rtn/eaquant: simulated per-token activation quantisation, 4 or 8")
    p.add_argument("--rotate", action="store_true",
                   help="rtn/eaquant: fold a block-Hadamard rotation into the experts (rotate their inputs online)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compression.methods import METHODS
    from .main import UsageError
    if args.list:
        for name in METHODS:
            print(name)
        return 0
    if not args.run:
        raise UsageError("give a run folder: moekit compress RUN --method NAME --out DIR (or --list)")
    if not args.out:
        raise UsageError("give --out DIR, the folder to write the compressed run (or the sweep) into")
    if args.sweep:
        from ..compression.runs import format_table, sweep_run
        rows = sweep_run(args.run, args.out, num_tokens=args.calibration_tokens)
        print(format_table(rows))
        print(f"wrote {args.out}/sweep.md, sweep.json, sweep.png")
        return 0
    if not args.method:
        raise UsageError("give --method NAME (moekit compress --list shows them) or --sweep")
    from ..compression.runs import compress_run
    options = {"bits": args.bits, "keep_experts": args.keep_experts, "target_memory": args.target_memory}
    if args.no_codec:
        options["codec"] = False
    if args.method == "mc-smoe":
        options["rank"] = args.rank
        if args.final_threshold is not None:
            options["final_threshold"] = args.final_threshold
    elif args.rank is not None or args.final_threshold is not None:
        raise UsageError(f"--rank and --final-threshold apply to --method mc-smoe, not {args.method}; drop them")
    if args.steps is not None:
        options["steps"] = args.steps
    if args.act_bits is not None:
        options["act_bits"] = args.act_bits
    if args.rotate:
        options["rotate"] = True
    report, _ = compress_run(args.run, args.method, args.out, num_tokens=args.calibration_tokens, **options)
    print(f"{args.method}: expert bytes {report.bytes_before:,} -> {report.bytes_after:,} "
          f"({report.memory_fraction:.3f} of float, {report.bits_per_param:.3f} bits per expert parameter)")
    print(f"wrote {args.out}; evaluate it with: moekit eval {args.out}")
    return 0
