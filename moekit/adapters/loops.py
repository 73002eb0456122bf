"""Whole-model training loops of the two methods that need more than a plain step: SEMA's continual expansion
(spec §23) and MoME's multi-scale training (spec §22), on a moekit :class:`~moekit.models.LanguageModel`.

Dim legend: B batch, S sequence, N pooled sequence (``S / rate``), D model dim, V vocabulary.

Data come as samplers: ``sample(generator) -> (x_BS, y_BS)`` token ids and their next tokens (``y = x`` shifted by
one), so any corpus or synthetic task plugs in.

**SEMA** (:func:`sema_continual`): tasks arrive one after another (over one call or several). Before each task,
every SEMA layer that has fitted a descriptor (seen a task) scores the task's inputs against its representation descriptors (``detect``) and expands (a new adapter,
router row and descriptor; all older ones frozen) where it sees a shift; the trainable adapters are trained on
the task; then each new descriptor is fitted on the task's inputs to that layer, and everything is frozen.
Layers that saw no shift reuse their adapters; a task on which no layer expands trains nothing.

**MoME** (:func:`mome_train`, :func:`pooled_logits`): the token embeddings are average-pooled at each rate
(Matryoshka compression of the input sequence) and the whole model runs on the pooled sequence, so the same
MoME routers see every scale; the loss is the mean over rates of next-token cross-entropy plus routing losses.
At rate r, pooled position n holds tokens ``n r .. n r + r - 1`` and predicts token ``(n + 1) r`` (causal).
Choice: the pooled sequence takes positions ``0 .. N - 1`` (the paper compresses audio-visual tokens before the
LLM; a text LM's token stream stands in for them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..types import RoutingContext
from .core import AdapterError
from .handle import adapters_of
from .mome import pool_sequence
from .sema import SEMA

__all__ = ["Sampler", "mome_train", "pooled_logits", "sema_continual"]

Sampler = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _wrappers_of(model: nn.Module, method: str, kind: type) -> dict[str, Any]:
    handle = adapters_of(model)
    found = {n: w for g in handle.groups if g.method == method for n, w in g.wrappers.items()}
    if not found or not all(isinstance(w.adapter, kind) for w in found.values()):
        raise AdapterError(f"this loop trains {method} adapters, but the model has {handle.method}; apply "
                           f"moekit.adapters.apply(model, {method!r}, ...) first")
    return found


def _layer_inputs(model: nn.Module, wrappers: dict[str, Any], x_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    """The flattened input ``[T, I]`` each wrapped module sees on ``x_BS``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, args: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).detach())

    hooks = [w.register_forward_pre_hook(keep(n)) for n, w in wrappers.items()]
    try:
        with torch.no_grad():
            model(x_BS)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _ce(logits_BSV: torch.Tensor, y_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())


def sema_continual(model: nn.Module, tasks: Sequence[Sampler], *, steps: int, lr: float = 3e-3, seed: int = 0,
                   descriptor_steps: int = 150) -> list[dict[str, Any]]:
    """Train the model's SEMA adapters on ``tasks`` in order; returns one record per task: the layers that
    expanded, the trainable parameters, and the training loss at the task's first and last step (None if
    nothing trained)."""
    wrappers = _wrappers_of(model, "sema", SEMA)
    if steps < 1 or not tasks:
        raise AdapterError(f"sema_continual needs steps >= 1 (got {steps}) and at least one task (got {len(tasks)})")
    handle = adapters_of(model)
    g = torch.Generator().manual_seed(seed)
    report = []
    for stage, sample in enumerate(tasks):
        expanded = []
        inputs = _layer_inputs(model, wrappers, sample(g)[0])
        for name, w in wrappers.items():  # a layer with a fitted descriptor has seen a task: look for a shift
            if w.adapter.rds()[-1].loss_std > 0 and w.adapter.detect(inputs[name]):
                w.adapter.expand()
                expanded.append(name)
        params = handle.parameters()
        losses: list[float] = []
        if params:
            opt = torch.optim.AdamW(params, lr=lr)
            model.train()
            for _ in range(steps):
                x_BS, y_BS = sample(g)
                logits_BSV, ctx = model(x_BS, RoutingContext())
                loss = _ce(logits_BSV, y_BS) + ctx.total_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            model.eval()
        inputs = _layer_inputs(model, wrappers, sample(g)[0])
        for name, w in wrappers.items():
            if w.adapter.rds()[-1].loss_std <= 0:  # added for this task (or the first): fit its descriptor
                w.adapter.fit_descriptor(inputs[name], steps=descriptor_steps)
            w.adapter.requires_grad_(False)  # everything so far is frozen; later expansions train
        report.append({"task": stage, "expanded": expanded, "trainable": sum(p.numel() for p in params),
                       "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
    return report


def pooled_logits(model: nn.Module, x_BS: torch.Tensor, rate: int, ctx: RoutingContext) -> torch.Tensor:
    """Logits ``[B, N, V]`` of a moekit LM run on its token embeddings average-pooled by ``rate``."""
    B, S = x_BS.shape
    if rate < 1 or S % rate:
        raise AdapterError(f"pooling rate {rate} must be >= 1 and divide the sequence length {S}")
    embed: Any = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding):
        raise AdapterError("pooled_logits runs a moekit LanguageModel (an 'embed' nn.Embedding); got "
                           f"{type(model).__name__}")
    pooled_BND = pool_sequence(embed(x_BS), rate)
    handle = embed.register_forward_hook(lambda module, args, out: pooled_BND)
    try:  # dummy ids of the pooled length: positions and shapes follow N; the hook hands over the pooled states
        logits_BNV, _ = model(x_BS[:, :S // rate], ctx)
    finally:
        handle.remove()
    return logits_BNV


def mome_train(model: nn.Module, sample: Sampler, *, rates: Sequence[int] = (1, 2, 4), steps: int,
               lr: float = 3e-3, seed: int = 0) -> list[dict[str, float]]:
    """Train the model's MoME adapters with the multi-scale loss (mean over ``rates``); one record per step with
    the total and each rate's loss."""
    _wrappers_of(model, "mome", nn.Module)
    handle = adapters_of(model)
    params = handle.parameters()
    if steps < 1 or not params:
        raise AdapterError(f"mome_train needs steps >= 1 (got {steps}) and trainable MoME parameters")
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    records = []
    model.train()
    for _ in range(steps):
        x_BS, y_BS = sample(g)
        terms: dict[int, torch.Tensor] = {}
        for rate in rates:
            ctx = RoutingContext()
            logits_BNV = pooled_logits(model, x_BS, rate, ctx)
            terms[rate] = _ce(logits_BNV, y_BS[:, rate - 1::rate]) + ctx.total_loss()
        total = torch.stack(list(terms.values())).mean()
        opt.zero_grad()
        total.backward()
        opt.step()
        records.append({"loss": float(total.detach()), **{f"loss_r{r}": float(t.detach()) for r, t in terms.items()}})
    model.eval()
    return records
