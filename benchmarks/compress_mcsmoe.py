"""MC-SMoE (``--method mc-smoe``: M-SMoE merging, then low-rank + row-sparse experts) on a trained run, beside
M-SMoE alone, frequency pruning and MC-SMoE without its distillation, at 50% and 25% of the float expert bytes;
plus the forward-pass time of the ``lowrank-sparse`` bank against the float model.

    python benchmarks/compress_mcsmoe.py RUN_DIR --out DIR [--calibration-tokens 8192] [--repeats 7]

Writes ``DIR/sweep.md``, ``sweep.json``, ``sweep.png`` (through :func:`moekit.compression.runs.sweep_run`) and
``DIR/speed.json``; prints the table. Speed is a median ratio of alternated (A B A B) forward passes of a
``[4, context]`` batch in one process.
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

from moekit.compression import compress
from moekit.compression.runs import calibration_tokens, format_table, sweep_run
from moekit.data import load_data
from moekit.training import load_run

POINTS = [("prune-frequency", {"target_memory": 0.5}), ("prune-frequency", {"target_memory": 0.25}),
          ("m-smoe", {"target_memory": 0.5}), ("m-smoe", {"target_memory": 0.25}),
          ("mc-smoe", {"target_memory": 0.5}), ("mc-smoe", {"target_memory": 0.25}),
          ("mc-smoe", {"target_memory": 0.5, "lowrank_steps": 0}), ("mc-smoe", {"target_memory": 0.25,
                                                                                "lowrank_steps": 0})]


def forward_ratio(run_dir: str, opts: dict, calib: torch.Tensor, repeats: int) -> float:
    """Median of (mc-smoe forward time / float forward time), alternating the two."""
    cfg, base, _ = load_run(run_dir, "cpu")
    _, small, _ = load_run(run_dir, "cpu")
    compress(small, "mc-smoe", calib, **opts)
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.context), generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.no_grad():
        base(x), small(x)  # warm up
        for _ in range(repeats):
            t0 = time.perf_counter()
            base(x)
            t1 = time.perf_counter()
            small(x)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    rows = sweep_run(args.run, args.out, points=POINTS, num_tokens=args.calibration_tokens)
    print(format_table(rows))
    cfg, _, _ = load_run(args.run, "cpu")
    calib = calibration_tokens(cfg, load_data(cfg.data), args.calibration_tokens)
    torch.set_num_threads(1)
    speed = {f"mc-smoe target_memory={t}": forward_ratio(args.run, {"target_memory": t, "lowrank_steps": 0}, calib,
                                                          args.repeats) for t in (0.5, 0.25)}
    print(json.dumps(speed, indent=2))
    (Path(args.out) / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")


if __name__ == "__main__":
    main()
