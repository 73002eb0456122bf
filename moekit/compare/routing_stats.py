"""A finished run's routing statistics on its validation batches, variant statistics included.

The trainer's summary keeps the core per-layer statistics (load CV, max/mean, dead experts, drop rate, bias
drift) but merges batches without the variants' own figures (``experts_per_token`` of top-p, ``zc_share`` and
``ffn_per_token`` of MoE++, ...). This module reloads the checkpoint and runs the same validation batches with
statistics on, averaging every figure over batches, per layer.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..data import load_data, val_batches
from ..training.runs import load_run
from ..types import RoutingContext

__all__ = ["validation_routing_stats"]


@torch.no_grad()
def validation_routing_stats(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """``{layer: {statistic: mean over validation batches}}`` of the checkpoint in ``run_dir`` (CPU)."""
    cfg, model, _ = load_run(run_dir, device="cpu")
    data = load_data(cfg.data)
    per_layer: dict[str, dict[str, list[float]]] = {}
    for x_BS, _ in val_batches(data, cfg.train.batch_size, cfg.model.context, cfg.train.eval_batches):
        ctx = RoutingContext(collect_stats=True)
        model(x_BS, ctx)
        for layer, row in ctx.stats_summary().items():
            for key, value in row.items():
                per_layer.setdefault(layer, {}).setdefault(key, []).append(value)
    return {layer: {k: statistics.fmean(v) for k, v in row.items()} for layer, row in per_layer.items()}
