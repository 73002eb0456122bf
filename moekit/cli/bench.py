"""``moekit bench``: the MoE layer benchmark of BENCHMARKS.md (ratios to dense-equivalent, one run).

    moekit bench                          # mixtral-s and fine-s, CPU float32
    moekit bench --shapes fine-s --repeats 5 --out bench_out/layer.json
    moekit bench --device cuda            # GPU shapes too, bfloat16
"""

from __future__ import annotations

import argparse
import json
import pathlib


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the MoE layer against dense and transformers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", help="shape names: mixtral-s, fine-s, mixtral-m, qwen3-30b-a3b")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per candidate (default: 10)")
    p.add_argument("--tokens", type=int, default=None, help="override the shape's token count")
    p.add_argument("--engines", nargs="*", default=None, help="moekit engines to time (default: sorted)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench.layer import SHAPES, bench_layer, format_table
    from ..runtime import tune_cpu_allocator

    tune_cpu_allocator()  # every candidate runs in this process, so all of them get the same allocator

    unknown = [s for s in args.shapes or [] if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available; use --device cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = args.shapes or [n for n, s in SHAPES.items() if gpu or not s.gpu_only]
    engines = tuple(args.engines or (("sorted", "grouped_mm") if gpu else ("sorted",)))
    results = []
    for name in shapes:
        result = bench_layer(name, args.device, dtype, args.repeats, engines, args.tokens)
        print(format_table(result), flush=True)
        results.append(result)
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return 0
