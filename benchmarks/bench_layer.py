"""MoE layer benchmark (BENCHMARKS.md): moekit engines vs dense-equivalent vs transformers, same run.

    python benchmarks/bench_layer.py                        # mixtral-s and fine-s on CPU, float32
    python benchmarks/bench_layer.py --device cuda          # adds the GPU shapes, bfloat16
    python benchmarks/bench_layer.py --out bench_out/layer.json

Same as ``moekit bench``.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from moekit.cli import bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    raise SystemExit(bench.run(parser.parse_args(["bench", *sys.argv[1:]])))
