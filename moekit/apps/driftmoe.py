"""DriftMoE (spec §28; code miguel-ceadar/drift-moe @a3d8a46): an online MoE under concept drift.

Per instance, prequential (test, then train):

1. a router MLP (d→256→128→E, dropout 0.2, Xavier init) gives logits ``l_E``; weights ``softmax(l_E / 0.8)``;
2. each expert (a river Hoeffding tree, grace period 50, confidence 1e-7) predicts;
3. the ensemble predicts what the highest-weighted expert predicts;
4. the multi-hot correctness mask ``m_E`` has ``m_i = 1`` iff expert ``i`` predicted ``y``; when no expert is
   correct ``m_{y mod E} = 1`` (the reference's ``m_y = 1``, taken modulo E because in data mode E may differ
   from the number of classes);
5. ``(x, m)`` is buffered and every 256 instances the router takes one Adam step (lr 2e-3) on
   ``BCEWithLogits(logits, m)`` over the buffer. Choice made here: the buffer holds the inputs and the logits
   are recomputed at the step (the router is unchanged in between, so this equals buffering the logits);
6. the top-K (K=3) experts by router weight learn ``(x, y)`` (data mode). Task mode is not built.

Data: river's drift streams (SEA with abrupt concept changes, Agrawal with concept changes, rotating
hyperplane, moving RBF), features standardised online. Baselines on the same stream: a river Hoeffding tree and
an adaptive random forest (ARF).

Dims: D features, E experts, N buffered instances.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["DriftMoE", "DriftMoEConfig", "correctness_mask", "make_stream", "run"]

STREAMS = ("sea", "agrawal", "hyperplane", "rbf")


@dataclass(frozen=True, kw_only=True)
class DriftMoEConfig:
    """DriftMoE application settings (defaults from the spec; stream length and seeds sized for a CPU)."""

    streams: tuple[str, ...] = STREAMS
    num_instances: int = 3000
    seeds: int = 3
    num_experts: int = 12
    top_k: int = 3
    temperature: float = 0.8
    update_every: int = 256
    lr: float = 2e-3
    grace_period: int = 50
    arf_models: int = 5
    baselines: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        for s in self.streams:
            check_field(s in STREAMS, name, "streams", s, f"one or more of {', '.join(STREAMS)}")
        check_field(len(self.streams) > 0, name, "streams", self.streams, "at least one stream")
        check_field(self.num_instances >= 10, name, "num_instances", self.num_instances, ">= 10")
        check_field(self.seeds >= 1, name, "seeds", self.seeds, ">= 1")
        check_field(self.num_experts >= 1, name, "num_experts", self.num_experts, ">= 1")
        check_field(1 <= self.top_k <= self.num_experts, name, "top_k", self.top_k,
                    f"1..num_experts={self.num_experts}", "lower top_k or raise num_experts")
        check_field(self.temperature > 0, name, "temperature", self.temperature, "> 0")
        check_field(self.update_every >= 1, name, "update_every", self.update_every, ">= 1")
        check_field(self.lr > 0, name, "lr", self.lr, "> 0")
        check_field(self.grace_period >= 1, name, "grace_period", self.grace_period, ">= 1")
        check_field(self.arf_models >= 1, name, "arf_models", self.arf_models, ">= 1")


def correctness_mask(preds: list[Any], y: Any, num_experts: int) -> torch.Tensor:
    """``m_E``: 1 for every expert whose prediction equals ``y``; if none, ``m_{y mod E} = 1`` (§28 step 4)."""
    m_E = torch.tensor([1.0 if p == y else 0.0 for p in preds])
    if m_E.sum() == 0:
        m_E[int(y) % num_experts] = 1.0
    return m_E


def _router(dim: int, num_experts: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 128), nn.ReLU(),
                        nn.Dropout(0.2), nn.Linear(128, num_experts))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class DriftMoE:
    """The online mixture: a torch router MLP over incremental experts (anything with river's
    ``predict_one`` / ``learn_one``)."""

    def __init__(self, dim: int, config: DriftMoEConfig, expert_factory: Callable[[], Any], seed: int) -> None:
        torch.manual_seed(seed)
        self.config = config
        self.router = _router(dim, config.num_experts)
        self.opt = torch.optim.Adam(self.router.parameters(), lr=config.lr)
        self.experts = [expert_factory() for _ in range(config.num_experts)]
        self.buf_x: list[torch.Tensor] = []
        self.buf_m: list[torch.Tensor] = []

    def weights(self, x_D: torch.Tensor) -> torch.Tensor:
        self.router.eval()
        with torch.no_grad():
            return torch.softmax(self.router(x_D) / self.config.temperature, dim=-1)

    def predict(self, x: dict, x_D: torch.Tensor) -> tuple[Any, list[Any], torch.Tensor]:
        w_E = self.weights(x_D)
        preds = [e.predict_one(x) for e in self.experts]
        return preds[int(w_E.argmax())], preds, w_E

    def router_step(self, x_ND: torch.Tensor, m_NE: torch.Tensor) -> float:
        """One Adam step on ``BCEWithLogits(router(x), m)``; returns the loss before the step."""
        self.router.train()
        loss = F.binary_cross_entropy_with_logits(self.router(x_ND), m_NE)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def learn(self, x: dict, x_D: torch.Tensor, y: Any, preds: list[Any], w_E: torch.Tensor) -> list[int]:
        """Buffer (x, mask), step the router when the buffer is full, train the top-K experts; returns them."""
        self.buf_x.append(x_D)
        self.buf_m.append(correctness_mask(preds, y, self.config.num_experts))
        if len(self.buf_x) >= self.config.update_every:
            self.router_step(torch.stack(self.buf_x), torch.stack(self.buf_m))
            self.buf_x, self.buf_m = [], []
        chosen = torch.topk(w_E, self.config.top_k).indices.tolist()
        for i in chosen:
            self.experts[i].learn_one(x, y)
        return chosen


def make_stream(name: str, seed: int, n: int):
    """A river drift stream of ``n`` instances with drift inside it (no download: generated)."""
    from river.datasets import synth
    s: Any
    if name == "sea":  # abrupt concept changes at 1/3 and 2/3
        s3 = synth.ConceptDriftStream(synth.SEA(variant=1, seed=seed), synth.SEA(variant=3, seed=seed + 1),
                                      position=n // 3, width=max(10, n // 100), seed=seed)
        s = synth.ConceptDriftStream(synth.SEA(variant=0, seed=seed + 2), s3, position=n // 3,
                                     width=max(10, n // 100), seed=seed)
    elif name == "agrawal":  # a gradual concept change in the middle
        s = synth.ConceptDriftStream(synth.Agrawal(classification_function=0, seed=seed),
                                     synth.Agrawal(classification_function=4, seed=seed + 1),
                                     position=n // 2, width=max(1, n // 20), seed=seed)
    elif name == "hyperplane":  # incremental drift
        s = synth.Hyperplane(seed=seed, n_features=10, n_drift_features=4, mag_change=0.001)
    else:  # moving centroids
        s = synth.RandomRBFDrift(seed_model=seed, seed_sample=seed + 1, n_classes=3, n_features=10,
                                 n_centroids=20, change_speed=0.001, n_drift_centroids=10)
    return s.take(n)


def _prequential(learner_kind: str, name: str, seed: int, cfg: DriftMoEConfig) -> list[int]:
    """Per-instance correctness (1/0) of a learner, test-then-train, on stream ``name`` with ``seed``."""
    from river import forest, preprocessing, tree
    random.seed(seed)
    scaler = preprocessing.StandardScaler()
    model: Any = None
    keys: list[str] | None = None
    hits: list[int] = []
    for x, y in make_stream(name, seed, cfg.num_instances):
        scaler.learn_one(x)
        xs = scaler.transform_one(x)
        if learner_kind == "driftmoe":
            if keys is None:
                keys = sorted(xs)
                model = DriftMoE(len(keys), cfg, lambda: tree.HoeffdingTreeClassifier(
                    grace_period=cfg.grace_period, delta=1e-7), seed)
            x_D = torch.tensor([float(xs[k]) for k in keys])
            pred, preds, w_E = model.predict(xs, x_D)
            hits.append(int(pred == y))
            model.learn(xs, x_D, y, preds, w_E)
        else:
            if model is None:
                model = (tree.HoeffdingTreeClassifier(grace_period=cfg.grace_period, delta=1e-7)
                         if learner_kind == "hoeffding_tree" else
                         forest.ARFClassifier(n_models=cfg.arf_models, seed=seed))
            hits.append(int(model.predict_one(xs) == y))
            model.learn_one(xs, y)
    return hits


@register_app("driftmoe", config=DriftMoEConfig, requires=("river",),
              summary="DriftMoE (§28): online router MLP over Hoeffding-tree experts on river drift streams, "
                      "vs Hoeffding tree and ARF")
def run(config: DriftMoEConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "driftmoe", config)
    learners = ["driftmoe"] + (["hoeffding_tree", "arf"] if config.baselines else [])
    results: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list[float]] = {}
    window = max(1, config.num_instances // 20)
    for name in config.streams:
        results[name] = {k: [] for k in learners}
        for seed in range(config.seeds):
            for kind in learners:
                hits = _prequential(kind, name, seed, config)
                acc = sum(hits) / len(hits)
                results[name][kind].append(acc)
                rec.log({"stream": name, "seed": seed, "learner": kind, "prequential_accuracy": acc})
                if seed == 0 and name == config.streams[0]:
                    curves[kind] = [sum(hits[i:i + window]) / len(hits[i:i + window])
                                    for i in range(0, len(hits), window)]
        rec.flush_metrics()
    table = {s: {k: median(v) for k, v in r.items()} for s, r in results.items()}

    def draw(fig, ax):
        for kind, c in curves.items():
            ax.plot([i * window for i in range(len(c))], c, label=kind)
        ax.set_title(f"Prequential accuracy per {window}-instance window ({config.streams[0]}, seed 0)")
        ax.set_xlabel("instance")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    rec.plot("prequential", draw)
    summary: dict = {"app": "driftmoe", "seeds": config.seeds, "num_instances": config.num_instances,
                     "median_prequential_accuracy": table}
    if config.baselines:
        summary["driftmoe_minus_arf"] = {s: t["driftmoe"] - t["arf"] for s, t in table.items()}
        summary["driftmoe_minus_hoeffding_tree"] = {s: t["driftmoe"] - t["hoeffding_tree"] for s, t in table.items()}
    return rec.finish(summary)
