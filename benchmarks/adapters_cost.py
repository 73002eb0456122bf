"""Adapter cost, measured as ratios in one run: prints a table and writes JSON.

- Forward+backward time of moekit's dense LM with adapters vs the frozen base model (no adapter, no weight
  gradient), for every method of ``moekit.adapters.available()``.
- MixLoRA's shared-base trick (``W_gate x`` and ``W_up x`` once for all tokens) vs the naive per-expert form.

Timing alternates the arms (A B A B ...) and reports medians; ratios only, never absolute claims.

Usage: ``python benchmarks/adapters_cost.py [--dim 128 --batch 8 --seq 128 --repeats 7 --out adapters_cost.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moekit import adapters
from moekit.bench.timing import run_environment
from moekit.models import LanguageModel, ModelConfig

OPTIONS = {
    "lora": (None, {"rank": 8}),
    "mixlora": (["ffn"], {"num_experts": 8, "top_k": 2, "rank": 8}),
    "lora_mixer": (None, {"num_experts": 8, "top_k": 2, "rank": 8}),
    "dynmole": (None, {"num_experts": 8, "rank": 8}),
    "flylora": (None, {"rank": 32, "top_k": 8}),
    "poly": (None, {"num_skills": 8, "rank": 8}),
    "mhr": (None, {"num_skills": 8, "rank": 8, "num_heads": 4}),
    "rank1": (None, {"rank": 16, "top_k": 4}),
}


def build(cfg: ModelConfig, method: str | None, **extra) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    if method is None:  # only the first norm's gain trains: the backward runs through every frozen block
        model.requires_grad_(False)
        model.layers[0].attn_norm.weight.requires_grad_(True)
        return model
    targets, options = OPTIONS[method]
    adapters.apply(model, method, targets, **{**options, **extra})
    return model


def step(model: LanguageModel, x: torch.Tensor):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        logits, ctx = model(x)
        (logits.logsumexp(-1).mean() + ctx.total_loss()).backward()
    return run


def layer_step(mix, weights, x):
    def run() -> None:
        mix.zero_grad(set_to_none=True)
        mix(x, weights).square().mean().backward()
    return run


def alternate(arms: dict, repeats: int) -> dict[str, float]:
    for fn in arms.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="adapters_cost.json")
    args = p.parse_args()
    cfg = ModelConfig(vocab_size=256, dim=args.dim, num_layers=args.layers, num_heads=4, context=args.seq, moe=None,
                      dense_hidden_dim=4 * args.dim)
    x = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = {"base (frozen)": build(cfg, None)}
    models.update({m: build(cfg, m) for m in OPTIONS})
    models["mixlora naive"] = build(cfg, "mixlora", naive=True)
    medians = alternate({k: step(m, x) for k, m in models.items()}, args.repeats)
    base = medians["base (frozen)"]
    rows = [{"arm": k, "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
             "time_ratio_vs_base": medians[k] / base} for k, m in models.items()]
    trick = medians["mixlora naive"] / medians["mixlora"]
    # the layer alone, wider, where the frozen projections dominate
    from moekit import FeedForward
    from moekit.adapters.core import ffn_weights
    from moekit.adapters.mixlora import MixLoRA, MixLoRAConfig
    torch.manual_seed(0)
    ffn = FeedForward(4 * args.dim, 16 * args.dim).requires_grad_(False)
    h = torch.randn(args.batch * args.seq, 4 * args.dim)
    layer_arms = {}
    for naive in (False, True):
        mix = MixLoRA(4 * args.dim, 16 * args.dim, True, MixLoRAConfig(num_experts=8, top_k=2, rank=8, naive=naive))
        layer_arms["naive" if naive else "trick"] = layer_step(mix, ffn_weights(ffn), h)
    layer_medians = alternate(layer_arms, args.repeats)
    layer_trick = layer_medians["naive"] / layer_medians["trick"]
    print(f"dense LM dim={args.dim} layers={args.layers} tokens={args.batch * args.seq}, fwd+bwd, median of "
          f"{args.repeats} alternated runs, {torch.get_num_threads()} threads")
    print(f"{'arm':<16}{'trainable':>12}{'time / base':>14}")
    for r in rows:
        print(f"{r['arm']:<16}{r['trainable']:>12,}{r['time_ratio_vs_base']:>14.2f}")
    print(f"MixLoRA naive / shared-base trick, in the LM: {trick:.2f}x; one FFN of dim {4 * args.dim}, hidden "
          f"{16 * args.dim}, E=8, k=2: {layer_trick:.2f}x")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "environment": run_environment("cpu"), "threads": torch.get_num_threads(),
                   "rows": rows, "mixlora_naive_over_trick": trick, "mixlora_layer_naive_over_trick": layer_trick},
                  f, indent=2)


if __name__ == "__main__":
    main()
