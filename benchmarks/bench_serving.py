"""Expert offloading, measured: decode tokens/s and peak RSS at expert budgets, per policy and prefetcher, and
the cache simulator's hit rates against Belady's bound and prefetch recall. Prints tables and writes JSON.

The model is a random-weight byte-level MoE LM written as a run folder (no training: tokens/s and cache
behaviour depend on sizes and routing, not on quality; routing of an untrained router is flatter than a
trained one's, which makes caching harder). Two configs: ``small`` (the ``coarse`` preset's layer sizes, the former ``default``) and
``large`` (32 experts x 8 layers, so experts dominate memory). Speed is a ratio to the fully resident model
measured in the same process, alternating A B A B, medians. Peak RSS is measured in a fresh process per budget.

Usage: ``python benchmarks/bench_serving.py [--config large --tokens 24 --repeats 3 --out serving.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit.bench.timing import run_environment
from moekit.configs import to_dict
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.serving import generate, load_offloaded
from moekit.serving.simulate import sweep
from moekit.serving.trace import trace_of
from moekit.training import load_run, with_overrides
from moekit.training.checkpoint import CONFIG_FILE, write_checkpoint, write_json

CONFIGS = {
    "small": {},  # the coarse preset (the default before issue 20: 8 experts x 512, top-2)
    "large": {"model.moe.num_experts": 32, "model.num_layers": 8, "model.moe.top_k": 2},
}
BUDGETS = ("100%", "50%", "25%", "12.5%")


def make_run(path: Path, name: str) -> Path:
    cfg = with_overrides(load_preset("coarse"), CONFIGS[name])
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / CONFIG_FILE, to_dict(cfg))
    write_checkpoint(path, model.state_dict(), {}, {"step": 0})
    return path


PROMPTS = [list(b"def main(argv):\n    "), list(b"import os\nimport sys\n")]


def decode(model, tokens: int, prompt: list[int] | None = None) -> float:
    """Seconds to greedily decode ``tokens`` tokens after ``prompt`` (default: every prompt), batch 1, KV cache."""
    t0 = time.perf_counter()
    for p in [prompt] if prompt is not None else PROMPTS:
        generate(model, torch.tensor([p]), tokens)
    return time.perf_counter() - t0


def speed(run: Path, tokens: int, repeats: int) -> list[dict]:
    _, resident, _ = load_run(run, "cpu")
    rows = []
    for budget in BUDGETS:
        for policy in ("lru", "lfu", "activation"):
            for prefetch in ("none", "router"):
                _, model, off = load_offloaded(run, budget, policy, prefetch=prefetch, record=False)
                decode(model, 2), decode(resident, 2)  # warm-up (fills the cache and the page cache)
                ratios, a, b = [], [], []
                for _ in range(repeats):  # A B A B, one prompt at a time; the ratio of each pair
                    for p in PROMPTS:
                        a.append(decode(resident, tokens, p))
                        b.append(decode(model, tokens, p))
                        ratios.append(a[-1] / b[-1])
                s = off.cache.stats
                rows.append({"budget": budget, "policy": policy, "prefetch": prefetch,
                             "resident_tok_s": tokens / statistics.median(a),
                             "offload_tok_s": tokens / statistics.median(b),
                             "ratio": statistics.median(ratios), "hit_rate": s.hit_rate,
                             "prefetch_hits": s.prefetch_hits, "load_seconds": s.load_seconds})
                print(f"{budget:>6} {policy:>10} {prefetch:>6}  {rows[-1]['offload_tok_s']:7.1f} tok/s  "
                      f"{rows[-1]['ratio']:.2f}x resident (median of {len(ratios)} paired ratios)  "
                      f"hit {s.hit_rate:.3f}", flush=True)
    return rows


def async_speed(run: Path, tokens: int, repeats: int, budget: str = "25%") -> dict:
    """Resident vs synchronous vs background-thread prefetch (``lfu`` + router) at ``budget``: A B C rotation,
    one prompt at a time, medians of the paired ratios."""
    _, resident, _ = load_run(run, "cpu")
    models = {"resident": resident}
    for name, asynchronous in (("sync", False), ("async", True)):
        models[name] = load_offloaded(run, budget, "lfu", prefetch="router", record=False,
                                      asynchronous=asynchronous)[1]
    for m in models.values():
        decode(m, 2)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for p in PROMPTS:
            for name, m in models.items():
                times[name].append(decode(m, tokens, p))
    out = {f"{k}_tok_s": tokens / statistics.median(v) for k, v in times.items()}
    out["async_over_sync"] = statistics.median(s / a for s, a in zip(times["sync"], times["async"], strict=True))
    out["sync_over_resident"] = statistics.median(r / s for r, s in zip(times["resident"], times["sync"], strict=True))
    out["async_over_resident"] = statistics.median(r / a for r, a in zip(times["resident"], times["async"],
                                                                        strict=True))
    out["pairs"] = len(times["sync"])
    print("async prefetch", out, flush=True)
    return out


def _status(field: str) -> float:
    """A field of /proc/self/status in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(run: str, budget: str, tokens: int) -> None:
    # A child inherits its parent's peak RSS across fork and exec; reset the peak first (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    if budget == "resident":
        _, model, _ = load_run(run, "cpu")
    else:
        _, model, _ = load_offloaded(run, budget, "lru", record=False)
    decode(model, tokens)
    print(json.dumps({"peak_rss_mb": _status("VmHWM"), "rss_anon_mb": _status("RssAnon"),
                      "rss_file_mb": _status("RssFile")}))


def peak_rss(run: Path, tokens: int) -> dict:
    """Peak RSS, and anonymous vs file-backed RSS at the end, per budget (a fresh process each).

    File-backed pages are the memory-mapped weights file: page cache the kernel may drop under pressure.
    """
    out = {}
    for budget in ("resident", *BUDGETS):
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(run), budget, "--tokens", str(tokens)],
                             capture_output=True, text=True, check=True)
        out[budget] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{budget:>9}: peak RSS {out[budget]['peak_rss_mb']:.0f} MB, at the end anonymous "
              f"{out[budget]['rss_anon_mb']:.0f} MB + file-backed {out[budget]['rss_file_mb']:.0f} MB", flush=True)
    return out


def simulated(run: Path, tokens: int) -> list[dict]:
    _, model, off = load_offloaded(run, "100%")
    decode(model, tokens)
    trace = trace_of(off)
    total = sum(b * e for b, e in zip(trace.expert_bytes, trace.num_experts))
    budgets = [int(total * float(b.rstrip("%")) / 100) for b in BUDGETS]
    per_layer_ms = 1.0  # compute time of one layer in the model; copies at 25 GB/s (PCIe 4 x16)
    rows = [dict(r.as_dict(), budget=BUDGETS[budgets.index(r.capacity_bytes)])
            for r in sweep(trace, budgets, bandwidth=25e9, compute_seconds=per_layer_ms / 1000)]
    for b in BUDGETS:
        best = max(r["hit_rate"] for r in rows if r["budget"] == b and r["policy"] == "belady")
        for r in rows:
            if r["budget"] == b:
                r["belady_gap"] = best - r["hit_rate"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="large")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default="bench_serving.json")
    parser.add_argument("--parts", default="speed,rss,sim", help="which measurements (comma-separated; also 'async')")
    parser.add_argument("--rss-child", nargs=2, metavar=("RUN", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_child:
        rss_child(*args.rss_child, args.tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", args.config)
        cfg = with_overrides(load_preset("coarse"), CONFIGS[args.config]).model
        print(f"config {args.config}: {dataclasses.asdict(cfg.moe)['num_experts']} experts x "
              f"{cfg.num_layers} layers, dim {cfg.dim}, expert hidden {cfg.moe.hidden_dim}", flush=True)
        parts = args.parts.split(",")
        result = {"config": args.config, "environment": run_environment("cpu"), "model": to_dict(cfg),
                  "tokens": args.tokens, "repeats": args.repeats, "threads": 1,
                  "speed": speed(run, args.tokens, args.repeats) if "speed" in parts else None,
                  "memory_mb": peak_rss(run, args.tokens) if "rss" in parts else None,
                  "simulated": simulated(run, args.tokens) if "sim" in parts else [],
                  "async": async_speed(run, args.tokens, args.repeats) if "async" in parts else None}
    for r in result["simulated"]:
        if r["prefetcher"] in ("none", "router", "oracle"):
            print(f"sim {r['budget']:>6} {r['policy']:>10} {r['prefetcher']:>8}  hit {r['hit_rate']:.3f}  "
                  f"gap to belady {100 * r['belady_gap']:5.1f} pts  recall {r['prefetch_recall']:.2f}  "
                  f"stall {1000 * r['stall_seconds']:.2f} ms")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
