"""Expert parallelism on CPU (gloo): all-to-all share of the MoE layer's time, and placement-planner loads.

Usage::

    python benchmarks/bench_ep.py                  # 2 and 4 local processes, one thread each
    python benchmarks/bench_ep.py --ranks 2 --iters 5 --tokens 512

Part 1 runs one MoE layer (``mixtral-s`` layer shape: dim 512, hidden 1024, 8 experts, top-2; float32) with the
``alltoall`` engine; each rank holds ``tokens`` tokens. Per iteration every rank times forward+backward of the
layer and the time spent inside its exchanges (count exchange with its host sync, token exchange, output
exchange and both backward exchanges; gloo is blocking, so the host clock is exact). Time a rank waits at an
exchange for a slower peer counts as all-to-all time, as it would in a real run. Reported: the median over
iterations of the all-to-all share, for the slowest rank and on average over ranks.

Part 2 profiles a 4-layer residual MoE stack (8 experts, top-2) on inputs drawn from unequal clusters (so
routing is skewed and correlated across layers), plans a placement with :func:`moekit.parallel.plan_placement`,
and compares the predicted (profile batch) and measured (held-out batch, tokens received per rank by the
``alltoall`` engine) busiest-rank load over the mean against round-robin and contiguous placements.

All processes share this machine's cores (2 here): with 4 ranks each gets half a core, so absolute times are
inflated and the share is a property of this CPU setup, not of a GPU cluster. A single GPU cannot measure NCCL
expert parallelism (it needs 2+ devices and their interconnect); no GPU figure is given.
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

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from moekit import MoE, MoEConfig
from moekit.bench.timing import run_environment
from moekit.parallel import (contiguous_placement, init_from_env, placement_metrics, plan_placement,
                             record_routing, round_robin_placement, run_local, shard_experts, uniform_plan)


def _a2a_worker(args: dict) -> dict:
    groups = init_from_env(int(os.environ["WORLD_SIZE"]))  # every rank in one EP group
    torch.manual_seed(0)
    cfg = MoEConfig(dim=args["dim"], hidden_dim=args["hidden_dim"], num_experts=args["experts"],
                    top_k=args["top_k"], engine="sorted")
    moe = shard_experts(MoE(cfg), groups)
    shard = moe.experts.expert_shard
    x = torch.randn(args["tokens"], cfg.dim, generator=torch.Generator().manual_seed(groups.rank),
                    requires_grad=True)
    grad = torch.randn_like(x)
    shares, layer_s, comm_s = [], [], []
    for it in range(args["warmup"] + args["iters"]):
        dist.barrier()
        shard.reset_stats()
        start = time.perf_counter()
        moe(x).backward(grad)
        total = time.perf_counter() - start
        moe.zero_grad(set_to_none=True)
        x.grad = None
        if it >= args["warmup"]:
            shares.append(shard.comm_seconds / total)
            layer_s.append(total)
            comm_s.append(shard.comm_seconds)
    return {"share": statistics.median(shares), "layer_s": statistics.median(layer_s),
            "a2a_s": statistics.median(comm_s), "ranks": groups.world_size,
            "received_rows": int(shard.received_L.sum())}


class _Stack(nn.Module):
    def __init__(self, num_layers: int = 4, dim: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = MoEConfig(dim=dim, hidden_dim=64, num_experts=8, top_k=2, engine="sorted")
        self.moes = nn.ModuleList([MoE(cfg, name=f"moe{i}") for i in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for moe in self.moes:
            x = x + moe(x)
        return x


def _skewed_batch(seed: int, tokens: int, dim: int = 64) -> torch.Tensor:
    """Tokens from 6 clusters with unequal weights: skewed, layer-to-layer correlated routing."""
    g = torch.Generator().manual_seed(1)  # the same clusters for every batch
    centers = 2.0 * torch.randn(6, dim, generator=g)
    weights = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.1, 0.05])
    g = torch.Generator().manual_seed(seed)
    which = torch.multinomial(weights, tokens, replacement=True, generator=g)
    return centers[which] + torch.randn(tokens, dim, generator=g)


def _placement_worker(placements: dict[str, dict], tokens: int) -> dict:
    groups = init_from_env(int(os.environ["WORLD_SIZE"]))
    x = _skewed_batch(seed=2, tokens=tokens * groups.world_size)[groups.rank * tokens:(groups.rank + 1) * tokens]
    out = {}
    for name, placement in placements.items():
        model = shard_experts(_Stack(), groups, placement)
        with torch.no_grad():
            model(x)
        per_layer = []
        for moe in model.moes:
            received = moe.experts.expert_shard.received_L.sum().reshape(1)
            gathered = [torch.zeros(1, dtype=received.dtype) for _ in range(groups.world_size)]
            dist.all_gather(gathered, received)
            per_layer.append([int(t) for t in gathered])
        out[name] = per_layer
    return out


def _placement_part(ranks: int, tokens: int) -> dict:
    model = _Stack()
    with record_routing(model) as profile, torch.no_grad():
        model(_skewed_batch(seed=1, tokens=tokens * ranks))
    plans = {"planned": plan_placement(profile, ranks),
             "round_robin": uniform_plan(profile, round_robin_placement(8, ranks)),
             "contiguous": uniform_plan(profile, contiguous_placement(8, ranks))}
    measured = run_local(_placement_worker, ranks, {k: p.as_dict() for k, p in plans.items()}, tokens,
                         timeout=300)[0]
    out = {}
    for name, plan in plans.items():
        predicted = placement_metrics(profile, plan)
        loads = torch.tensor(measured[name], dtype=torch.float64)  # [layers, ranks]
        out[name] = {"predicted_max_over_mean": predicted["max_over_mean_load"],
                     "measured_max_over_mean": (loads.amax(1) / loads.mean(1)).mean().item(),
                     "predicted_cross_rank_share": predicted["cross_rank_share"],
                     "predicted_max_pair_traffic": predicted["max_pair_traffic"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="process counts to run")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank (part 1)")
    parser.add_argument("--dim", type=int, default=512, help="model dim")
    parser.add_argument("--hidden-dim", type=int, default=1024, help="expert hidden dim")
    parser.add_argument("--experts", type=int, default=8, help="experts")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations")
    parser.add_argument("--iters", type=int, default=8, help="timed iterations")
    parser.add_argument("--placement-tokens", type=int, default=2048, help="tokens per rank (part 2)")
    parser.add_argument("--out", default="bench_out/bench_ep.json", help="JSON output path")
    a = parser.parse_args()
    cfg = {"tokens": a.tokens, "dim": a.dim, "hidden_dim": a.hidden_dim, "experts": a.experts,
           "top_k": a.top_k, "warmup": a.warmup, "iters": a.iters}
    report = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": run_environment("cpu"),
              "config": cfg,
              "a2a": {}, "placement": {}}
    print(f"Part 1: all-to-all share of MoE layer forward+backward ({a.dim}/{a.hidden_dim}, E={a.experts}, "
          f"top-{a.top_k}, {a.tokens} tokens/rank, float32, 1 thread/rank)")
    print(f"{'ranks':>5} {'layer ms (max)':>15} {'a2a ms (max)':>13} {'share (max)':>12} {'share (mean)':>13}")
    for ranks in a.ranks:
        rows = run_local(_a2a_worker, ranks, cfg, timeout=600)
        row = {"layer_ms_max": 1e3 * max(r["layer_s"] for r in rows),
               "a2a_ms_max": 1e3 * max(r["a2a_s"] for r in rows),
               "share_max": max(r["share"] for r in rows),
               "share_mean": statistics.mean(r["share"] for r in rows), "per_rank": rows}
        report["a2a"][ranks] = row
        print(f"{ranks:>5} {row['layer_ms_max']:>15.1f} {row['a2a_ms_max']:>13.1f} {row['share_max']:>12.1%} "
              f"{row['share_mean']:>13.1%}")
    print("\nPart 2: busiest rank's load / mean load (averaged over 4 layers; 1.0 is perfect)")
    print(f"{'ranks':>5} {'placement':>12} {'predicted':>10} {'measured':>9} {'cross-rank transitions':>23}")
    for ranks in a.ranks:
        part = _placement_part(ranks, a.placement_tokens)
        report["placement"][ranks] = part
        for name, m in part.items():
            print(f"{ranks:>5} {name:>12} {m['predicted_max_over_mean']:>10.3f} "
                  f"{m['measured_max_over_mean']:>9.3f} {m['predicted_cross_rank_share']:>23.1%}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
