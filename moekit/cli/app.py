"""``moekit app``: run one of the application papers (``moekit app --list`` names them).

Examples::

    moekit app --list
    moekit app driftmoe --out runs/driftmoe
    moekit app advmoe --out runs/advmoe --seeds=1 --epochs=4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .main import UsageError

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("app", help="run an application paper (moekit app --list)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the applications and exit")
    p.add_argument("name", nargs="?", help="the application to run")
    p.add_argument("settings", nargs=argparse.REMAINDER,
                   help="--out DIR (default runs/NAME) and config settings --key=value")
    p.set_defaults(func=run)


def _parse(rest: list[str]) -> tuple[str | None, dict[str, str]]:
    out, values, i = None, {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"unrecognised argument {arg!r}; settings look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise UsageError(f"{arg} needs a value: {arg}=VALUE")
            value, i = rest[i + 1], i + 1
        if key == "out":
            out = value
        else:
            values[key] = value
        i += 1
    return out, values


def run(args: argparse.Namespace) -> int:
    from ..apps.common import config_from_strings
    from ..apps.registry import get_app, list_apps
    if args.list:
        apps = list_apps()
        width = max(len(a.name) for a in apps)
        for a in apps:
            print(f"{a.name.ljust(width)}  {a.summary}")
        return 0
    if not args.name:
        raise UsageError("name an application (moekit app --list shows them)")
    spec = get_app(args.name)
    if any(a in ("-h", "--help") for a in args.settings):
        import dataclasses
        print(f"moekit app {spec.name} [--out DIR] [--key=value ...]\n{spec.summary}\n\nsettings (default):")
        for f in dataclasses.fields(spec.config_cls):
            print(f"  --{f.name}={f.default!r}")
        return 0
    out, values = _parse(args.settings)
    config = config_from_strings(spec.config_cls, values)  # bad values fail before anything is written
    from ..apps.registry import require
    require(*spec.requires)
    out_dir = Path(out or f"runs/{spec.name}")
    summary = spec.run(config, out_dir)
    json.dump(summary, sys.stdout, indent=2)
    print(f"\nwrote {out_dir}/ (config.json, metrics.jsonl, summary.json, plots)")
    return 0
