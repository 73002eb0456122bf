"""Continual fine-tuning: tasks arrive one after another (add, copy, sort, mul). Sequential LoRA vs rank-1 experts
(Little by Little: new ranks per task, old ones frozen) vs SEMA (a new adapter only when its descriptors flag a
shift). Reports each task's loss (bits/byte) after every stage, forgetting (final minus just-trained loss on the
earlier tasks), and the adapters / trainable parameters added. Prints a table, writes JSON.

The base is a pre-trained dense moekit run (``--base``; ``benchmarks/adapters_multitask.py`` leaves one).
Usage: ``python benchmarks/adapters_continual.py --base runs/adapters_multitask/base [--steps 150 --seeds 2]``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics

import torch
import torch.nn.functional as F

from moekit import adapters
from moekit.bench.timing import run_environment
from moekit.data.synthetic import arithmetic_line, copy_line, sort_line
from moekit.training import load_run

TASKS = ("add", "copy", "sort", "mul")


def task_text(task: str, seed: int, num_bytes: int = 60_000) -> torch.Tensor:
    rng, parts, total = random.Random(seed), [], 0
    while total < num_bytes:
        line = {"add": lambda: arithmetic_line(rng, 4, "+"), "mul": lambda: arithmetic_line(rng, 4, "*"),
                "copy": lambda: copy_line(rng), "sort": lambda: sort_line(rng)}[task]()
        parts.append(line)
        total += len(line)
    return torch.tensor(list("".join(parts).encode()), dtype=torch.long)


def batch(data: torch.Tensor, context: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=g)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + context + 1] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def bpb(model, data: torch.Tensor, context: int) -> float:
    g = torch.Generator().manual_seed(123)
    x, y = batch(data, context, 32, g)
    logits, _ = model(x)
    return float(F.cross_entropy(logits.flatten(0, 1), y.flatten())) / math.log(2)


def layer_inputs(model, handle, x) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [w.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, w in handle.wrappers.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def run(method: str, base: str, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    cfg, model, _ = load_run(base, "cpu")
    ctxlen = cfg.model.context
    options = {"lora": {"rank": 8}, "rank1": {"rank": 4, "top_k": 4, "alpha": 4.0},
               "sema": {"bottleneck": 8, "descriptor_dim": 32}}[method]
    handle = adapters.apply(model, method, None, **options)
    test = {t: task_text(t, 10_000 + i) for i, t in enumerate(TASKS)}
    losses, added, trainable = [], [], []
    g = torch.Generator().manual_seed(seed)
    for stage, task in enumerate(TASKS):
        data = task_text(task, seed * 100 + stage)
        grew = 0
        if stage > 0 and method == "rank1":
            for w in handle.wrappers.values():
                w.adapter.add_ranks(4)
            grew = len(handle.wrappers)
        if method == "sema":
            inputs = layer_inputs(model, handle, batch(data, ctxlen, 16, g)[0])
            for name, w in handle.wrappers.items():
                if stage > 0 and w.adapter.detect(inputs[name]):
                    w.adapter.expand()
                    grew += 1
        params = handle.parameters()
        trainable.append(sum(p.numel() for p in params))
        added.append(grew)
        model.train()
        opt = torch.optim.AdamW(params, lr=3e-3) if params else None
        for _ in range(steps if opt is not None else 0):
            x, y = batch(data, ctxlen, 16, g)
            logits, ctx = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + ctx.total_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        if method == "sema":
            inputs = layer_inputs(model, handle, batch(data, ctxlen, 16, g)[0])
            for name, w in handle.wrappers.items():
                if w.adapter.rds()[-1].loss_std <= 0:
                    w.adapter.fit_descriptor(inputs[name], steps=150)
                w.adapter.requires_grad_(False)  # everything added so far is frozen; only expansions train
        losses.append({t: bpb(model, test[t], ctxlen) for t in TASKS[:stage + 1]})
    forgetting = statistics.mean(losses[-1][t] - losses[i][t] for i, t in enumerate(TASKS[:-1]))
    return {"losses": losses, "forgetting": forgetting, "grown_layers": added, "trainable": trainable,
            "final_mean": statistics.mean(losses[-1].values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--methods", default="lora,rank1,sema")
    p.add_argument("--out", default="adapters_continual.json")
    args = p.parse_args()
    results = {}
    for method in args.methods.split(","):
        rows = [run(method, args.base, args.steps, seed) for seed in range(args.seeds)]
        results[method] = rows
        f = [r["forgetting"] for r in rows]
        fin = [r["final_mean"] for r in rows]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        print(f"{method:<6} forgetting {statistics.mean(f):+.3f}±{sd(f):.3f} bits/byte, final mean "
              f"{statistics.mean(fin):.3f}±{sd(fin):.3f}, layers that grew per stage {rows[0]['grown_layers']}, "
              f"trainable per stage {rows[0]['trainable']}", flush=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "environment": run_environment("cpu"), "tasks": TASKS, "results": results},
                  fh, indent=2)


if __name__ == "__main__":
    main()
