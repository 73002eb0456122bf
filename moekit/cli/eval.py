"""``moekit eval RUN``: validation loss, bits per byte and routing statistics of a run's checkpoint."""

from __future__ import annotations

import argparse
import json

from ..training import evaluate_run
from .common import add_threads_argument

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run's checkpoint on its validation data",
                              description="Validation loss, bits per byte and per-layer expert load of a run's "
                              "checkpoint.\n\nExamples:\n  moekit eval runs/default\n"
                              "  moekit eval runs/default --batches 16 --json")
    p.add_argument("run", metavar="RUN", help="a run folder written by moekit train")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's train.eval_batches)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run; auto: CUDA when available (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--matmul", choices=("dequantize", "int8"), default=None,
                   help="compressed runs: int8 multiplies RTN/GPTQ/EAQuant experts with torch._int_mm on int8 "
                        "activations (CPU); default: dequantise each expert as it runs")
    add_threads_argument(p, "torch's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .main import UsageError
    if args.batches is not None and args.batches < 1:
        raise UsageError(f"--batches={args.batches} must be at least 1")
    result = evaluate_run(args.run, args.batches, args.device, args.matmul)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"step {result['step']}: validation loss {result['val_loss']:.4f} nats/token, "
          f"{result['val_bpb']:.4f} bits/byte over {result['val_tokens']:,} tokens")
    for name, row in result["layers"].items():
        print(f"  {name}: load CV {row['load_cv']:.3f}, max/mean {row['max_over_mean']:.2f}, "
              f"dead experts {int(row['dead_experts'])}")
    return 0
