"""Forward time of an RTN-quantised run with the int8 matmul path (``torch._int_mm``) against the float model and
the dequantise-per-expert path, measured in one process, alternated (A B C A B C ...), medians of the ratios.

    python benchmarks/compress_int8_speed.py RUN_DIR [--bits 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench.timing import run_environment
from moekit.compression import compress
from moekit.compression.calibrate import find_moe_layers
from moekit.compression.runs import calibration_tokens
from moekit.data import load_data
from moekit.training import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg, base, _ = load_run(args.run, "cpu")
    _, small, _ = load_run(args.run, "cpu")
    compress(small, "rtn", calibration_tokens(cfg, load_data(cfg.data), 4096), bits=args.bits)
    banks = [moe.experts for _, moe in find_moe_layers(small)]
    x = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))

    def run(mode: str) -> float:
        for b in banks:
            b.matmul = mode
        t0 = time.perf_counter()
        small(x)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"float": [], "dequantize": [], "int8": []}
    with torch.no_grad():
        base(x), run("dequantize"), run("int8")  # warm up
        for b in banks:
            b.matmul = "dequantize"
        ref = small(x)[0]
        for b in banks:
            b.matmul = "int8"
        diff = float((small(x)[0] - ref).abs().mean() / ref.abs().mean())
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            base(x)
            times["float"].append(time.perf_counter() - t0)
            times["dequantize"].append(run("dequantize"))
            times["int8"].append(run("int8"))
    r = {"int8/float": statistics.median(i / f for i, f in zip(times["int8"], times["float"])),
         "dequantize/float": statistics.median(d / f for d, f in zip(times["dequantize"], times["float"])),
         "int8/dequantize": statistics.median(i / d for i, d in zip(times["int8"], times["dequantize"])),
         "logit_mean_rel_diff_int8_vs_dequantize": diff, "bits": args.bits, "threads": args.threads,
         "repeats": args.repeats, "environment": run_environment("cpu")}
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
