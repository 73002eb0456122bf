"""``moekit config``: every config key of a preset (or config file, with overrides), its value and meaning."""

from __future__ import annotations

import argparse
import json

from .common import add_config_arguments, config_from_args

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config", help="list every config key with its default and meaning",
        description="List every config key of a preset (after --config and overrides): its value, which "
        "--section.key=value changes, and what it means.\n\nExamples:\n"
        "  moekit config                              # the default preset\n"
        "  moekit config --preset tiny --train.lr=1e-3\n"
        "  moekit config --preset coe --json          # the resolved config as JSON")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print the resolved config as JSON instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config_help import describe_config, format_config
    from ..configs import to_dict
    cfg = config_from_args(args)
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    print(f"# {cfg.name}: {cfg.description}\n# change any key with --KEY=VALUE (e.g. --train.max_steps=512)\n")
    print(format_config(describe_config(cfg)))
    return 0
