"""Mixture-of-Recursions: causal threshold inference vs the (non-causal) top-k of training, on a small trained
``mor`` model. Prints a table and writes JSON.

Per seed: train the ``mor`` preset at a reduced size, then evaluate the same checkpoint with
``eval_routing="threshold"`` (causal: a token recurses iff sigmoid(router logit) > 0.5) and
``eval_routing="expert_choice"`` (top-k over each validation sequence, as in training). Reports validation
bits/byte, mean recursion depth and fraction processed under each rule, and the training statistic
``threshold_agreement`` of the last validation (share of candidate decisions where the threshold reproduces
top-k), for ``inference_router`` = main (BCE on the step's router) and aux (a separate router).

Usage: ``python benchmarks/mor_inference.py [--steps 300 --seeds 3 --out docs/bench/mor_inference.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from moekit import RoutingContext
from moekit.bench.timing import run_environment
from moekit.data import load_data
from moekit.data.dataset import val_batches
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.training import train, with_overrides
from moekit.training.checkpoint import load_checkpoint
from moekit.training.evaluate import evaluate

SIZE = {"model.dim": 64, "model.num_layers": 4, "model.num_heads": 4, "model.context": 64,
        "model.moe.hidden_dim": 128, "data.max_files": 200, "data.max_bytes": 2_000_000, "train.batch_size": 8,
        "train.eval_every": 0, "train.eval_batches": 8, "train.max_seconds": None, "train.device": "cpu",
        "train.threads": 1}


@torch.no_grad()
def agreement(cfg, out: Path, data) -> float:
    """``threshold_agreement`` of the trained model in training mode (top-k routing) on validation batches."""
    model = LanguageModel(cfg.model)
    load_checkpoint(out, model)
    model.train()
    values = []
    for x_BS, _ in val_batches(data, 8, cfg.model.context, 16):
        _, ctx = model(x_BS, RoutingContext(collect_stats=True))
        values.append(float(ctx.stats["mor"].extra["threshold_agreement"]))
    return statistics.mean(values)


def run(seed: int, steps: int, router: str, root: Path) -> dict:
    cfg = with_overrides(load_preset("mor"), {**SIZE, "train.seed": seed, "train.max_steps": steps})
    depth = dict(cfg.model.depth_routing or {})
    cfg = replace(cfg, model=replace(cfg.model, depth_routing={**depth, "inference_router": router}))
    out = root / f"{router}-{seed}"
    train(cfg, out, progress=False)
    data = load_data(cfg.data)
    row: dict = {"seed": seed, "router": router, "threshold_agreement_train": agreement(cfg, out, data)}
    for rule in ("threshold", "expert_choice"):
        model_cfg = replace(cfg.model, depth_routing={**depth, "inference_router": router, "eval_routing": rule})
        model = LanguageModel(model_cfg)
        load_checkpoint(out, model)
        ev = evaluate(model, data, batch_size=8, num_batches=16)
        mor = ev["layers"].get("mor", {})
        row[rule] = {"val_bpb": ev["val_bpb"], "mean_depth": mor.get("mean_depth"),
                     "fraction_processed": mor.get("fraction_processed")}
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--routers", default="main,aux")
    p.add_argument("--out", default="mor_inference.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for router in args.routers.split(","):
            for seed in range(args.seeds):
                rows.append(run(seed, args.steps, router, Path(tmp)))
                r = rows[-1]
                print(f"{router} seed {seed}: bpb threshold {r['threshold']['val_bpb']:.4f} (depth "
                      f"{r['threshold']['mean_depth']:.3f}) vs top-k {r['expert_choice']['val_bpb']:.4f} (depth "
                      f"{r['expert_choice']['mean_depth']:.3f}); agreement in training "
                      f"{r['threshold_agreement_train']:.3f}", flush=True)
    print("\n| inference router | val bpb, threshold (causal) | val bpb, top-k | mean depth, threshold | "
          "mean depth, top-k | threshold agreement |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for router in args.routers.split(","):
        sel = [r for r in rows if r["router"] == router]

        def ms(rule, key, sel=sel):
            vals = [r[rule][key] for r in sel]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f}±{sd:.3f}"
        agree = [r["threshold_agreement_train"] for r in sel]
        print(f"| {router} | {ms('threshold', 'val_bpb')} | {ms('expert_choice', 'val_bpb')} | "
              f"{ms('threshold', 'mean_depth')} | {ms('expert_choice', 'mean_depth')} | "
              f"{statistics.mean(agree):.3f} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "environment": run_environment("cpu"), "size": SIZE,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
