"""transformers' experts implementation vs the same model patched by ``moekit.hf.patch``, in one process.

Small-but-not-trivial random Mixtral and Qwen3-MoE models (4 layers, 16 / 32 experts) are built from their
config classes; the patched copy shares their weights' values. For forward (inference, no grad) and
forward+backward (training mode, language-model loss plus aux loss), A and B runs alternate after warm-up and
the medians are compared: ``speedup = time(transformers) / time(moekit)``.

    python benchmarks/bench_hf.py                     # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_hf.py --eager             # also time transformers' eager loop
    python benchmarks/bench_hf.py --json bench_out/bench_hf.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moekit.hf as mh  # noqa: E402
from moekit.hf.tiny import tiny_model  # noqa: E402

MODELS = {
    "mixtral": dict(dim=256, hidden_dim=512, num_experts=16, top_k=2, num_layers=4, num_heads=8, vocab_size=1024),
    "qwen3_moe": dict(dim=256, hidden_dim=256, num_experts=32, top_k=4, num_layers=4, num_heads=8,
                      vocab_size=1024),
}


def step(model, ids, backward: bool) -> None:
    if backward:
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(ids)


def timed(model, ids, backward: bool) -> float:
    t = time.perf_counter()
    step(model, ids, backward)
    return time.perf_counter() - t


def compare(variants: dict, ids, backward: bool, warmup: int, repeats: int) -> dict[str, float]:
    for model in variants.values():
        model.train(backward)
        for _ in range(warmup):
            step(model, ids, backward)
    times = {name: [] for name in variants}
    for _ in range(repeats):  # alternate so that load changes on a shared machine hit every variant alike
        for name, model in variants.items():
            times[name].append(timed(model, ids, backward))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default 7)")
    p.add_argument("--eager", action="store_true", help="also time transformers' eager experts loop")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for arch, sizes in MODELS.items():
        base = tiny_model(arch, **sizes, init_std=0.05)
        default_impl = base.config._experts_implementation
        variants = {f"transformers[{default_impl}]": base}
        if args.eager:
            variants["transformers[eager]"] = tiny_model(arch, **sizes, init_std=0.05,
                                                          experts_implementation="eager")
        variants["moekit[auto]"] = mh.patch(copy.deepcopy(base))
        ids = torch.randint(0, sizes["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = base(ids).logits
            for name, model in variants.items():
                diff = (model(ids).logits - ref).abs().max().item()
                assert diff < 1e-3, f"{name} disagrees with transformers by {diff}"
        for backward in (False, True):
            med = compare(variants, ids, backward, args.warmup, args.repeats)
            ref_t = med[f"transformers[{default_impl}]"]
            for name, t in med.items():
                rows.append({"model": arch, "experts": sizes["num_experts"], "top_k": sizes["top_k"],
                             "pass": "fwd+bwd" if backward else "fwd", "variant": name, "median_ms": 1e3 * t,
                             "speedup_vs_default": ref_t / t})
                r = rows[-1]
                print(f"{arch:<10} E={r['experts']:<3} k={r['top_k']}  {r['pass']:<8} {name:<26} "
                      f"{r['median_ms']:9.1f} ms   x{r['speedup_vs_default']:.2f}", flush=True)
    meta = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "tokens_per_step": args.batch * args.seq,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
