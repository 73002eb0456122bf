"""``moekit compare``: train a study's arms under one budget on the same data and seeds, then tabulate and plot.

Examples::

    moekit compare --list
    moekit compare moe-vs-dense --quick                    # seconds: a smoke check of the whole pipeline
    moekit compare moe-vs-dense --seeds 2 --workers 2      # the real study, 2 seeds, 2 runs at a time
    moekit compare my_study.toml --out runs/compare/mine --train.lr=1e-3
    moekit compare balancing --seeds 2 --budget 409600   # half the tokens
    moekit compare balancing --plan                        # steps and FLOPs per arm, without training

Rerunning the same command reuses finished runs and resumes interrupted ones (Ctrl-C checkpoints them).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare presets at equal budget over seeds (table + plots)",
                              description="Train every arm of a study under one budget (equal tokens, FLOPs or "
                              "wall time) with the same data and seeds; write results.md, results.json and plots.")
    p.add_argument("study", nargs="?", help="a shipped study (see --list) or the path of a study .toml file")
    p.add_argument("--list", action="store_true", help="list the shipped studies and exit")
    p.add_argument("--quick", action="store_true", help="the study's seconds-long [quick] version (for tests)")
    p.add_argument("--seeds", type=int, metavar="N", help="use the first N seeds (default: the study's list)")
    p.add_argument("--arms", nargs="+", metavar="ARM",
                   help="train only these arms (default: all; the reference arm must be one of them)")
    p.add_argument("--budget", type=float, metavar="AMOUNT",
                   help="replace the study's budget amount (tokens, FLOPs or seconds, per its kind)")
    p.add_argument("--budget-clock", choices=("wall", "cpu"), metavar="CLOCK",
                   help="time budgets: count wall time ('wall') or each run's CPU seconds in training steps ('cpu', "
                        "fair on a shared machine with --threads 1)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="runs at a time, one process each (default: min(runs, cores)); 0 trains in this process")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads per run (default: cores // workers)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/compare/<study>)")
    p.add_argument("--plan", action="store_true", help="print each arm's parameters, steps and FLOPs; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.epilog = "Config overrides for every arm: --section.key=value (e.g. --train.lr=1e-3); they change cache keys."
    p.set_defaults(func=run, overrides=True)


def run(args: argparse.Namespace) -> int:
    from ..compare import describe_plan, list_studies, load_study, plan_study, run_study
    from .main import UsageError
    if args.list:
        studies = list_studies()
        width = max(len(n) for n, _ in studies)
        for name, description in studies:
            print(f"{name.ljust(width)}  {description}")
        return 0
    if not args.study:
        raise UsageError("name a study (moekit compare --list shows the shipped ones) or give a study .toml file")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers {args.workers} must be >= 0 (0 trains in this process)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be >= 1")
    study = load_study(args.study, quick=args.quick)
    if args.seeds is not None:
        study = study.with_seeds(args.seeds)
    if args.arms:
        study = study.with_arms(args.arms)
    if args.budget_clock is not None and study.budget.kind != "time":
        raise UsageError(f"--budget-clock applies to time budgets only; study {study.name!r} has a "
                         f"{study.budget.kind!r} budget")
    if args.budget is not None or args.budget_clock is not None:
        study = study.with_budget(args.budget, args.budget_clock)
    if args.plan:
        print(f"{study.name}: {study.budget.describe()}, seeds {list(study.seeds)}")
        print(describe_plan(plan_study(study, args.overrides)))
        return 0
    _check_memory(plan_study(study, args.overrides), args.workers)
    out = Path(args.out) if args.out else Path("runs") / "compare" / study.name
    command = "moekit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    result = run_study(study, out, workers=args.workers, threads=args.threads, overrides=args.overrides,
                       progress=not args.no_progress, command=command)
    print(result.markdown)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    if not result.complete:
        print("some runs did not finish; rerun the same command to resume them", file=sys.stderr)
        return 1
    return 0


def _check_memory(specs, workers: int | None) -> None:
    """Refuse (exit 2) a study whose runs, as many at once as the workers, would not fit in memory."""
    from ..bench.memory import check_fits, training_bytes
    from ..compare.runner import default_workers
    from ..configs import ConfigError
    from .main import UsageError

    if not specs:
        return
    at_once = max(1, min(len(specs), default_workers(len(specs)) if workers is None else workers))
    worst = max(specs, key=lambda s: training_bytes(s.config))
    try:
        check_fits(training_bytes(worst.config, at_once),
                   f"this study ({at_once} run(s) at once, the largest arm {worst.arm!r})",
                   "lower --workers, train.batch_size or the model size")
    except ConfigError as e:
        raise UsageError(str(e)) from None
