"""``moekit checkpoint export|import RUN``: between a run's sharded checkpoint and its single-file one."""

from __future__ import annotations

import argparse

from ..training.sharded import export_full, import_full

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("checkpoint", help="export a sharded (torch.distributed.checkpoint) checkpoint to "
                              "the single-file one that eval/sample read, or import it back",
                              description="export: RUN/sharded -> the single-file checkpoint (for eval, sample, "
                              "compress); import: the single-file checkpoint -> RUN/sharded (to resume with "
                              "--parallel.checkpoint=sharded). One process; any layout wrote the shards.")
    p.add_argument("action", choices=("export", "import"), help="which way to convert")
    p.add_argument("run", metavar="RUN", help="a run folder written by moekit train")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state = (export_full if args.action == "export" else import_full)(args.run)
    where = "single-file checkpoint" if args.action == "export" else "sharded checkpoint"
    print(f"{args.run}: wrote the {where} of step {state['step']}")
    return 0
