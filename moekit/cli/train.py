"""``moekit train``: train a preset, a config file or either with overrides; ``--resume`` continues a run."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from ..training import train, with_overrides
from ..training.runs import read_run_config
from .common import add_config_arguments, add_threads_argument, config_from_args

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (default preset: a small MoE LM, 256 steps, ~4 minutes on 2 CPU cores)",
                              description="Train a language model; the run folder gets config.json, "
                              "metrics.jsonl, summary.json, a checkpoint and plots. On several processes: "
                              "torchrun --nproc_per_node=N -m moekit train ... [--parallel.ep_size=E] "
                              "(data parallel; E consecutive processes share the experts). Ctrl-C or SIGTERM stops after the current "
                              "step with a checkpoint, summary and plots (exit status 130 / 143); --resume continues."
                              "\n\nExamples:\n"
                              "  moekit train --out runs/default            # 256 steps, ~4 minutes on 2 CPU cores\n"
                              "  moekit train --preset tiny --out runs/tiny --train.max_steps=100\n"
                              "  moekit train --resume --out runs/default --train.max_steps=512   # train on\n"
                              "  moekit train --train.max_seconds=120      # a time budget (depends on machine load)")
    add_config_arguments(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<preset>-<date>-<time>)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars (training and routing statistics) into DIR/tensorboard; "
                   "needs the tensorboard extra (default: off)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out (its config, plus any overrides of train.* / data.* / "
                   "parallel.*; a checkpoint resumes under any --parallel.ep_size); a finished run continues with a larger "
                   "budget, e.g. --train.max_steps=512")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary table")
    add_threads_argument(p, "the config's train.threads, else torch's; same as --train.threads=N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .main import UsageError
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads} must be >= 1")
        args.overrides = {**(args.overrides or {}), "train.threads": str(args.threads)}
    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out DIR, the folder of the run to continue")
        if args.preset or args.config:
            raise UsageError("--resume takes the run's own config.json; drop --preset / --config")
        cfg = with_overrides(read_run_config(args.out), args.overrides or {})
        out = Path(args.out)
    else:
        cfg = config_from_args(args)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress, tensorboard=args.tensorboard)
    if result.stopped_by:  # checkpointed and summarised; the exit status says a signal ended it (128 + n)
        return 128 + int(getattr(signal, result.stopped_by, signal.SIGINT))
    return 0
