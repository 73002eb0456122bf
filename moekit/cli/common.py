"""Helpers shared by the commands: building a run config from ``--preset``, ``--config`` and overrides."""

from __future__ import annotations

import argparse

from ..recipes import load_config_file, load_preset
from ..training import RunConfig, with_overrides

__all__ = [
    "HelpFormatter",
    "add_config_arguments",
    "add_threads_argument",
    "apply_threads",
    "config_from_args",
    "plain_text",
]


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (examples stay readable); every option's help ends with its default
    unless it already says it (flags, whose default is off, and options whose text explains ``None``, excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is False or default == argparse.SUPPRESS or not action.option_strings
                or action.nargs == 0):
            return text
        if default is None:
            return f"{text} (default: none)"
        shown = ' '.join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # argparse %-formats help strings


def plain_text(doc: str) -> str:
    """A docstring as terminal text: no reStructuredText literals (````x````) or ``::`` block markers, and
    long unindented lines wrapped (indented lines, the examples, stay as written)."""
    import textwrap
    lines = []
    for line in doc.replace("``", "").replace("::\n", ":\n").splitlines():
        lines += textwrap.wrap(line, 100) if len(line) > 100 and not line[:1].isspace() else [line]
    return "\n".join(lines)


def add_threads_argument(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument("--threads", type=int, metavar="N", help=f"CPU threads for torch (default: {default_text})")


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` for this process, after checking the value."""
    if threads is None:
        return
    from .main import UsageError
    if threads < 1:
        raise UsageError(f"--threads {threads} must be >= 1")
    import torch
    torch.set_num_threads(threads)
