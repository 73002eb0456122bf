"""``moekit train``: train a preset, a config file or either with overrides; ``--resume`` continues a run."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from ..training import train, with_overrides
from ..training.runs import read_run_config
from .common import add_config_arguments, config_from_args

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (default preset: a small MoE LM, ~4 minutes on CPU)",
                              description="Train a language model; the run folder gets config.json, "
                              "metrics.jsonl, summary.json, a checkpoint and plots. On several processes: "
                              "torchrun --nproc_per_node=N -m moekit train ... [--parallel.ep_size=E] "
                              "(data parallel; E consecutive processes share the experts). "
                              "Ctrl-C or SIGTERM stops after the current step with a checkpoint, summary and plots "
                              "(exit status 130 / 143); "
                              "--resume continues.")
    add_config_arguments(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<preset>-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out (its config, plus any overrides of train.* / data.* / "
                   "parallel.*; a checkpoint resumes under any --parallel.ep_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .main import UsageError
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
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if result.stopped_by:  # checkpointed and summarised; the exit status says a signal ended it (128 + n)
        return 128 + int(getattr(signal, result.stopped_by, signal.SIGINT))
    return 0
