"""Helpers shared by the commands: building a run config from ``--preset``, ``--config`` and overrides."""

from __future__ import annotations

import argparse

from ..recipes import load_config_file, load_preset
from ..training import RunConfig, with_overrides

__all__ = ["add_config_arguments", "config_from_args"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a shipped preset (list them with `moekit presets`); default: default")
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file laid over the preset")
    parser.epilog = ("Any config field can be overridden as --section.key=value, e.g. --train.max_steps=200 "
                     "--model.moe.top_k=1 --data.source=arithmetic.")
    parser.set_defaults(overrides=True)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (default ``default``), then ``--config``, then the dotted overrides."""
    if args.config:
        cfg = load_config_file(args.config, preset=args.preset or "default")
    else:
        cfg = load_preset(args.preset or "default")
    return with_overrides(cfg, args.overrides or {})
