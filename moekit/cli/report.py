"""``moekit report RUN|STUDY``: one self-contained HTML page (plots, tables, config, routing, samples)."""

from __future__ import annotations

import argparse

from .common import add_threads_argument

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="one self-contained HTML page of a run or a compare study (opens offline)",
        description="Write one self-contained HTML page (plots embedded, no network) of a training run "
        "(summary, training plots, routing statistics per layer, the routing analysis if moekit analyze wrote "
        "one, samples, every config key) or of a moekit compare study (results table, plots, runs).\n\n"
        "Examples:\n  moekit report runs/default                    # writes runs/default/report.html\n"
        "  moekit report runs/compare/moe-vs-dense --out mvd.html\n"
        "  moekit report runs/default --samples 0          # no text generation")
    p.add_argument("path", metavar="RUN|STUDY", help="a moekit train --out folder or a moekit compare --out folder")
    p.add_argument("--out", metavar="FILE.html", help="where to write the page (default: RUN|STUDY/report.html)")
    p.add_argument("--samples", type=int, default=3, help="text samples generated from a run's checkpoint (0-5)")
    p.add_argument("--sample-tokens", type=int, default=80, help="tokens per sample")
    add_threads_argument(p, "torch's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report
    from .main import UsageError
    if not 0 <= args.samples <= 5 or args.sample_tokens < 1:
        raise UsageError("need 0 <= --samples <= 5 and --sample-tokens >= 1")
    out = write_report(args.path, args.out, samples=args.samples, sample_tokens=args.sample_tokens)
    print(f"wrote {out}")
    return 0
