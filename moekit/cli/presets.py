"""``moekit presets``: the presets shipped with moekit, one line each."""

from __future__ import annotations

import argparse

from ..recipes import list_presets

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    presets = list_presets()
    width = max(len(name) for name, _ in presets)
    for name, description in presets:
        print(f"{name.ljust(width)}  {description}")
    return 0
