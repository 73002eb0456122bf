"""FSDP2 + expert parallelism on CPU (gloo): per-process memory, all-to-all share and step time vs processes.

Usage::

    python benchmarks/bench_fsdp.py                       # 1, 2 and 4 local processes, one thread each
    python benchmarks/bench_fsdp.py --worlds 1 2 --steps 4

One language model at a fixed size (dim 128, 4 layers, 8 experts of hidden 256, top-2; 3.45 M parameters,
3.15 M of them in experts) trains a few steps of the real training step (``moekit.training.train_step``) under
each layout:

- ``dp``: every process holds the whole model (plain data parallelism);
- ``ep``: experts split over all processes (``ep_size = world``), the rest replicated;
- ``fsdp+ep``: experts split over all processes, everything else sharded by FSDP2.

Reported per layout and world size: the largest per-process bytes of parameters + AdamW state (local shards
only, counted after the first step created the state), the median step time over the timed steps (each
process trains its own micro-batch of 4 x 64 tokens: weak scaling), and the all-to-all share of the step (time
inside the expert exchanges over the step time, mean over ranks; gloo is blocking, so the host clock is exact).
Every process shares this machine's cores: with more processes than cores, step times grow for that reason
alone; memory figures do not depend on it. Writes ``benchmarks/results/bench_fsdp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import torch  # noqa: E402

from moekit.bench.timing import run_environment  # noqa: E402
from moekit.data import load_data  # noqa: E402
from moekit.models import LanguageModel  # noqa: E402
from moekit.parallel import init_from_env, memory_per_rank, run_local, sharded_banks  # noqa: E402
from moekit.recipes import load_preset  # noqa: E402
from moekit.training import with_overrides  # noqa: E402
from moekit.training.distributed import Distributed  # noqa: E402
from moekit.training.optim import build_optimizer  # noqa: E402
from moekit.training.trainer import train_step  # noqa: E402

LAYOUTS = {"dp": (False, False), "ep": (True, False), "fsdp+ep": (True, True)}  # (expert parallel, fsdp)


def config(ep_size: int, fsdp: bool):
    return with_overrides(load_preset("tiny"), {
        "model.dim": "128", "model.num_layers": "4", "model.num_heads": "4", "model.context": "64",
        "model.moe.num_experts": "8", "model.moe.hidden_dim": "256", "model.moe.top_k": "2",
        "train.batch_size": "4", "train.max_steps": "100", "parallel.ep_size": str(ep_size),
        "parallel.fsdp": str(fsdp).lower()})


def worker(layout: str, steps: int) -> dict:
    expert_parallel, fsdp = LAYOUTS[layout]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep = world if expert_parallel else 1
    cfg = config(ep, fsdp)
    groups = init_from_env(ep)
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    Distributed(groups, fsdp=fsdp).shard(model)
    optimizer = build_optimizer(model, cfg.train)
    data = load_data(cfg.data)
    times, shares = [], []
    for step in range(steps + 1):  # step 0: warm-up (and creates the optimizer state)
        shards = [bank.expert_shard for _, bank in sharded_banks(model)]
        for shard in shards:
            shard.reset_stats()
        t0 = time.perf_counter()
        train_step(model, optimizer, data, cfg, step, torch.device("cpu"), groups=groups)
        dt = time.perf_counter() - t0
        if step:
            times.append(dt)
            shares.append(sum(s.comm_seconds for s in shards) / dt)
    return {"memory": memory_per_rank(model, optimizer), "step_s": statistics.median(times),
            "alltoall_share": statistics.median(shares) if shares else 0.0, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "bench_fsdp.json"))
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        for layout in LAYOUTS:
            if world == 1 and layout != "dp":
                continue  # one process: every layout is the whole model
            if world == 1:
                os.environ.pop("WORLD_SIZE", None)
                results = [worker(layout, args.steps)]
            else:
                results = run_local(worker, world, layout, args.steps, timeout=600)
            mem = max(r["memory"]["total"] for r in results)
            row = {"world": world, "layout": layout, "max_bytes_per_process": mem,
                   "expert_bytes": max(r["memory"]["expert_params"] for r in results),
                   "step_s": statistics.median(r["step_s"] for r in results),
                   "alltoall_share": statistics.mean(r["alltoall_share"] for r in results),
                   "params": results[0]["params"]}
            rows.append(row)
            print(f"world {world} {layout:8s}: {mem / 2**20:7.2f} MiB/process (params + AdamW), "
                  f"step {row['step_s'] * 1e3:7.1f} ms, all-to-all {row['alltoall_share']:.0%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "steps": args.steps}
    Path(args.out).write_text(json.dumps({"meta": meta, "environment": run_environment("cpu"), "rows": rows},
                                     indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
