"""Validation: loss, bits per byte and routing statistics over fixed validation batches.

Dim legend: B batch, S sequence, V vocabulary, E experts.

Bits per byte = ``loss_per_token / ln 2 / bytes_per_token``: for byte-level data a token is a byte; for a
subword tokenizer the validation text's bytes per token converts the loss to the same tokenizer-free unit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigError
from ..data import TokenData, val_batches
from ..types import LayerStats, RoutingContext

__all__ = ["evaluate", "autocast", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, dtype: str):
    """bfloat16 autocast, or nothing for float32."""
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _merge(acc: dict[str, list], stats: dict[str, LayerStats]) -> None:
    for name, s in stats.items():
        acc.setdefault(name, []).append(s)


def _combined(parts: list[LayerStats]) -> LayerStats:
    """One layer's statistics over several batches; variant statistics (``extra``) are averaged."""
    keys = {k for p in parts for k in p.extra}
    extra: dict[str, torch.Tensor | float] = {
        k: sum(float(p.extra[k]) for p in parts if k in p.extra) / sum(k in p.extra for p in parts) for k in keys}
    # sums of tensors (``parts`` is never empty), typed ``Tensor | int`` by the builtin sum
    return LayerStats(counts_E=cast(torch.Tensor, sum(p.counts_E for p in parts)),
                      num_slots=sum(p.num_slots for p in parts),
                      num_dropped=cast(torch.Tensor, sum(p.num_dropped for p in parts)),
                      token_entropy=cast(torch.Tensor, sum(p.token_entropy for p in parts)) / len(parts),
                      bias_E=parts[-1].bias_E, extra=extra)


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, *, batch_size: int, num_batches: int, dtype: str = "float32",
             device: torch.device | str = "cpu") -> dict:
    """Validation loss (nats per token), bits per byte, and per-layer routing statistics.

    Returns:
        ``{"val_loss", "val_bpb", "val_tokens", "layers": {name: summary}, "load": {name: counts_E list}}``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    stats: dict[str, list[LayerStats]] = {}
    model_config: Any = model.config
    try:
        for x_BS, y_BS in val_batches(data, batch_size, model_config.context, num_batches):
            x_BS, y_BS = x_BS.to(device), y_BS.to(device)
            with autocast(device, dtype):
                logits_BSV, ctx = model(x_BS, RoutingContext(collect_stats=True))
            loss_sum += F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten(), reduction="sum").item()
            tokens += y_BS.numel()
            _merge(stats, ctx.stats)
    finally:
        model.train(was_training)
    val_loss = loss_sum / tokens
    merged = {name: _combined(parts) for name, parts in stats.items()}
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / data.bytes_per_token, "val_tokens": tokens,
            "layers": {name: s.summary() for name, s in merged.items()},
            "load": {name: s.counts_E.tolist() for name, s in merged.items()}}
