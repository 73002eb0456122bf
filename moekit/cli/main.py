"""The ``moekit`` command: ``moekit COMMAND ...`` (also ``python -m moekit COMMAND ...``).

Commands are modules of this package listed in :data:`COMMANDS`, each exposing ``register(subparsers)`` that
adds its parser and sets ``func(args) -> int``. A listed module that does not exist yet is skipped. A command
that sets ``overrides=True`` receives the ``--section.key=value`` arguments as ``args.overrides`` (a dict).

Errors a user can cause (bad config keys or values, missing or corrupt run folders, bad arguments) print one
line to stderr and exit with status 2, without a traceback.

Examples::

    moekit presets
    moekit info --preset default
    moekit train                                  # the default preset: 256 steps, about 4 minutes on 2 CPU cores
    moekit train --preset tiny --out runs/tiny --train.max_steps=100 --model.moe.top_k=1
    moekit eval runs/tiny
    moekit sample runs/tiny --prompt "def " --temperature 0.8
    moekit config --preset default                # every config key with its default and meaning
    moekit report runs/tiny                       # one self-contained HTML page of a run or study
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..configs import ConfigError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main", "parse_overrides"]

COMMANDS = ("train", "eval", "sample", "info", "presets", "config", "bench", "analyze", "compare", "report", "compress",
            "finetune", "serve_sim", "serve", "checkpoint", "app")


class UsageError(ConfigError):
    """A command line that cannot be run as written."""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models: train, evaluate, "
                                     "sample and inspect.", epilog="moekit COMMAND --help shows a command's options "
                                     "and examples.\n\nExamples:\n" + __doc__.split("Examples::\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue  # a command another part of moekit has not added yet
            raise
        module.register(sub)
    _tidy_help(sub)
    return parser


def _tidy_help(sub) -> None:
    """Every subcommand: defaults in its help, plain-text description (its one-line help when it has none)."""
    from .common import HelpFormatter, plain_text
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = HelpFormatter
        p.description = plain_text(p.description or helps.get(name) or "")
        p.epilog = plain_text(p.epilog) if p.epilog else None


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """``["--model.dim=64", "--train.lr", "1e-3"]`` -> ``{"model.dim": "64", "train.lr": "1e-3"}``."""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UsageError(f"unrecognised argument {arg!r}; config overrides look like --section.key=value "
                             f"(e.g. --train.max_steps=100)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise UsageError(f"{arg} needs a value: {arg}=VALUE")
            value, i = extra[i + 1], i + 1
        out[key] = value
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    prog = f"moekit {args.command}"
    try:
        if getattr(args, "overrides", False):
            args.overrides = parse_overrides(extra)
        elif extra:
            raise UsageError(f"unrecognised arguments: {' '.join(extra)} (see {prog} --help)")
        from ..runtime import tune_cpu_allocator
        tune_cpu_allocator()  # large CPU temporaries stay in the heap (see moekit.runtime)
        if args.command not in ("train", "compare", "sample"):  # those choose their own threads
            from .common import apply_threads
            apply_threads(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `moekit presets | head -1`
        return 0
    except (ConfigError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
