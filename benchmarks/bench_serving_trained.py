"""Serving a *trained* MoE: cache hit rates against Belady, prefetch recall (router / affinity / M2R2),
asynchronous vs synchronous prefetch, and bit-nested (D²MoE HEBF) offloading with low-bit misses.

Trains a small byte-level MoE on the stdlib corpus first (a few minutes on a CPU), then replays decoding on
held-out text token by token with a KV cache (teacher forcing: real text, the access pattern of decoding):

1. traces of the training text (to profile the affinity table and the activation prior, and to train M2R2's
   accelerators) and of held-out text (to measure);
2. the simulator over budgets × policies × prefetchers, gaps to Belady with a perfect predictor and to Belady with
   no prefetch; per-token next-layer recall of the router and M2R2 prefetchers;
3. live decoding at 25% with router prefetch, synchronous vs background thread (A B alternation, medians);
4. the model compressed with ``d2moe-mwq`` and served plane by plane under budgets: hit rate, full-precision
   share, bytes moved and held-out NLL against the resident compressed model.

Usage: ``python benchmarks/bench_serving_trained.py [--steps 200 --out docs/bench/serving_trained_cpu.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.bench.timing import run_environment
from moekit.compression import compress
from moekit.data import load_data
from moekit.recipes import load_preset
from moekit.serving import load_offloaded
from moekit.serving.m2r2 import collect_moe_inputs, next_layer_recall, train_accelerators
from moekit.serving.nested import offload_nested
from moekit.serving.simulate import simulate
from moekit.serving.trace import affinity_table, trace_of
from moekit.training import load_run, train, with_overrides

MODEL = {"model.dim": 128, "model.num_layers": 4, "model.num_heads": 4, "model.context": 128,
         "model.moe.hidden_dim": 256, "model.moe.num_experts": 16, "model.moe.top_k": 2,
         "train.batch_size": 8, "train.eval_every": 0, "train.eval_batches": 2, "train.threads": 1,
         "train.device": "cpu"}
BUDGETS = (0.5, 0.25, 0.125)


def windows(stream: torch.Tensor, n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length - 1, (n,), generator=g)
    return [stream[s:s + length].long() for s in starts.tolist()]


@torch.no_grad()
def feed(model, seqs: list[torch.Tensor], offload=None) -> float:
    """Token-by-token forward with a KV cache over each sequence; mean next-token NLL (nats)."""
    nll, count = 0.0, 0
    for seq in seqs:
        if offload is not None:
            offload.new_request()
        cache = model.new_cache(1)
        for i in range(len(seq) - 1):
            logits, _ = model(seq[i:i + 1][None], cache=cache)
            nll += float(F.cross_entropy(logits[0, -1:], seq[i + 1:i + 2]))
            count += 1
    return nll / max(count, 1)


def record(run: Path, seqs, prefetch="router", accelerators=None):
    _, model, off = load_offloaded(run, "100%", prefetch=prefetch, accelerators=accelerators)
    feed(model, seqs, off)
    return trace_of(off)


def sim_table(fit, router_tr, m2r2_tr) -> list[dict]:
    table = affinity_table(fit)
    counts: dict = {}
    for step in fit.steps:
        for layer, entry in enumerate(step):
            for e in entry["experts"]:
                counts[(layer, e)] = counts.get((layer, e), 0) + 1
    prior = {k: v / max(len(fit.steps), 1) for k, v in counts.items()}  # activations per step, from training text
    total = sum(b * e for b, e in zip(router_tr.expert_bytes, router_tr.num_experts, strict=True))
    rows = []
    kw = dict(bandwidth=25e9, compute_seconds=1e-3)
    for share in BUDGETS:
        cap = int(total * share)
        for policy in ("lru", "lfu", "activation", "activation+prior", "reuse", "reuse+prior", "belady"):
            name = policy.split("+")[0]
            pri = prior if policy.endswith("+prior") else None
            for pf, tr, sim_pf in (("none", router_tr, "none"), ("router", router_tr, "router"),
                                   ("m2r2", m2r2_tr, "router"), ("affinity", router_tr, "affinity"),
                                   ("oracle", router_tr, "oracle")):
                r = simulate(tr, name, sim_pf, cap, affinity=table, prior=pri, **kw)
                rows.append({"budget": share, "policy": policy, "prefetch": pf, "hit_rate": r.hit_rate,
                             "recall": r.prefetch_recall, "stall_ms": 1000 * r.stall_seconds,
                             "mb_moved": r.bytes_moved / 1e6})
    for share in BUDGETS:
        opt = next(r["hit_rate"] for r in rows if r["budget"] == share and r["policy"] == "belady"
                   and r["prefetch"] == "oracle")
        demand = next(r["hit_rate"] for r in rows if r["budget"] == share and r["policy"] == "belady"
                      and r["prefetch"] == "none")
        for r in rows:
            if r["budget"] == share:
                r["gap_belady_oracle"], r["gap_belady_demand"] = opt - r["hit_rate"], demand - r["hit_rate"]
                same = next(q["hit_rate"] for q in rows if q["budget"] == share and q["policy"] == "belady"
                            and q["prefetch"] == r["prefetch"])
                r["gap_belady_same_prefetch"] = same - r["hit_rate"]
    return rows


def speed(run: Path, seqs, repeats: int, acc) -> dict:
    _, resident, _ = load_run(run, "cpu")
    models = {"resident": (resident, None)}
    for name, policy, prefetch, asynchronous in (("sync", "lfu", "router", False), ("async", "lfu", "router", True),
                                                 ("reuse_m2r2", "reuse", "m2r2", False)):
        _, m, off = load_offloaded(run, "25%", policy, prefetch=prefetch, record=False, asynchronous=asynchronous,
                                   accelerators=acc)
        models[name] = (m, off)
    times: dict[str, list[float]] = {k: [] for k in models}
    for name, (m, off) in models.items():
        feed(m, seqs[:1], off)  # warm-up
    for _ in range(repeats):  # A B C A B C
        for name, (m, off) in models.items():
            t0 = time.perf_counter()
            feed(m, seqs[1:2], off)
            times[name].append(time.perf_counter() - t0)
    tokens = len(seqs[1]) - 1
    out = {k: tokens / statistics.median(v) for k, v in times.items()}
    out["async_over_sync"] = statistics.median(s / a for s, a in zip(times["sync"], times["async"], strict=True))
    out["sync_over_resident"] = statistics.median(r / s for r, s in zip(times["resident"], times["sync"], strict=True))
    out["async_over_resident"] = statistics.median(r / a for r, a in zip(times["resident"], times["async"],
                                                                        strict=True))
    out["reuse_m2r2_over_resident"] = statistics.median(r / a for r, a in zip(times["resident"],
                                                                              times["reuse_m2r2"], strict=True))
    out["wait_seconds_async"] = models["async"][1].cache.stats.wait_seconds
    out["hit_rates"] = {k: off.cache.stats.hit_rate for k, (_, off) in models.items() if off is not None}
    return out


def nested(run: Path, data, seqs) -> list[dict]:
    _, model, _ = load_run(run, "cpu")
    float_nll = feed(model, seqs)
    calib = torch.stack(windows(data.train, 32, 128, seed=7))
    t0 = time.perf_counter()
    compress(model, "d2moe-mwq", calib, bits=2, levels=2)
    seconds = time.perf_counter() - t0
    full = feed(model, seqs)
    rows = [{"setting": "float32 experts (before compression)", "nll": float_nll},
            {"setting": "resident, all planes (4-bit)", "nll": full, "compress_seconds": seconds}]
    base = copy.deepcopy(model)
    for block in base.layers:
        block.ffn.experts.active_levels = 0
    rows.append({"setting": "resident, base only (2-bit)", "nll": feed(base, seqs)})
    for share in ("50%", "25%"):
        for miss_levels, keep in ((2, True), (0, True), (0, False)):
            m = copy.deepcopy(model)
            off = offload_nested(m, share, miss_levels=miss_levels, keep_bases=keep, record=False)
            off.cache.record_log = False
            nll = feed(m, seqs, off)
            s = off.cache.stats.as_dict()
            rows.append({"setting": f"{share}, miss_levels={miss_levels}, keep_bases={keep}", "nll": nll,
                         "hit_rate": s["hit_rate"], "full_precision_rate": s["full_precision_rate"],
                         "mean_levels": s["mean_levels_served"], "mb_moved": s["bytes_moved"] / 1e6,
                         "budget_mb": off.cache.capacity_bytes / 1e6})
    for r in rows:
        r["delta_nll_vs_all_planes"] = r["nll"] - full
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seqs", type=int, default=6)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_serving_trained.json")
    parser.add_argument("--run", default=None, help="reuse a trained run folder (skip training)")
    parser.add_argument("--keep", default=None, help="train into this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = with_overrides(load_preset("coarse"), {**MODEL, "train.max_steps": args.steps})
        t0 = time.perf_counter()
        run = Path(args.run) if args.run else train(cfg, Path(args.keep or Path(tmp) / "run"), progress=False).out_dir
        train_seconds = None if args.run else time.perf_counter() - t0
        data = load_data(cfg.data)
        print(f"trained {args.steps} steps in {train_seconds} s", flush=True)
        fit_seqs = windows(data.train, args.seqs, args.length, seed=1)
        val_seqs = windows(data.val, args.seqs, args.length, seed=2)
        _, resident, _ = load_run(run, "cpu")
        moes = [f for _, f in resident.sparse_layers()]
        acc, hist = train_accelerators(resident, moes, torch.stack(windows(data.train, 32, 128, seed=3)),
                                       rank=16, steps=300, lr=1e-2, kl_weight=5.0)
        xs = collect_moe_inputs(resident, moes, torch.stack(val_seqs))
        recall = {"router": next_layer_recall(moes, xs, lambda layer, x: x), "m2r2": next_layer_recall(moes, xs, acc),
                  "m2r2_train_loss": hist}
        print("per-token next-layer recall", recall, flush=True)
        fit = record(run, fit_seqs)
        router_tr = record(run, val_seqs)
        m2r2_tr = record(run, val_seqs, "m2r2", acc)
        assert router_tr.accesses() == m2r2_tr.accesses()  # offloading never changes what runs
        sims = sim_table(fit, router_tr, m2r2_tr)
        for r in sims:
            print(f"sim {r['budget']:6.3f} {r['policy']:>16} {r['prefetch']:>8} hit {r['hit_rate']:.3f} "
                  f"gap(belady+oracle) {100 * r['gap_belady_oracle']:5.1f} gap(belady) "
                  f"{100 * r['gap_belady_demand']:5.1f} gap(belady, same prefetch) "
                  f"{100 * r['gap_belady_same_prefetch']:5.1f} recall {r['recall']:.2f}", flush=True)
        sp = speed(run, val_seqs, args.repeats, acc)
        print("speed", sp, flush=True)
        nest = nested(run, data, val_seqs[:3])
        for r in nest:
            print("nested", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    out = {"model": MODEL, "steps": args.steps, "train_seconds": train_seconds, "seqs": args.seqs,
           "length": args.length, "threads": 1, "recall": recall, "simulated": sims, "speed": sp, "nested": nest,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": run_environment("cpu")}
    Path(args.out).write_text(json.dumps(out, indent=1, default=lambda o: None if isinstance(o, float)
                                         and math.isnan(o) else str(o)) + "\n")


if __name__ == "__main__":
    main()
