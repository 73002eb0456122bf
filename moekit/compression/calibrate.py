"""The calibration pass shared by every compression method: run a model over calibration tokens and record, for
each MoE layer, its inputs and its routing decision.

Dim legend: T calibration tokens, D model dim, E experts, K slots per token, N sequences, S sequence length.

The record is taken by a forward hook on each layer's :class:`~moekit.routing.Router`, so it works for a
:class:`~moekit.models.LanguageModel` and for a transformers model patched by :func:`moekit.hf.patch` alike
(the patched block calls ``route`` and ``combine`` directly, never ``MoE.forward``). From a record a method reads
each expert's routed inputs (QMoE's per-expert Hessians, EAQuant's per-expert calibration), routing frequencies
(M-SMoE, pruning) and router logits (M-SMoE's similarity).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..configs import ConfigError
from ..layers import MoE

__all__ = ["CompressionError", "LayerRecord", "calibrate", "check_calibration", "find_moe_layers", "run_model"]


class CompressionError(ConfigError):
    """A compression request that cannot be carried out as asked; the message says what to change."""


@dataclass
class LayerRecord:
    """What one MoE layer saw during calibration.

    Attributes:
        name: the layer's module name in the model.
        x_TD: its inputs (float32, on CPU).
        expert_ids_TK: chosen experts (-1: empty slot).
        weights_TK: combine weights.
        logits_TE: raw router logits.
    """

    name: str
    x_TD: torch.Tensor
    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[1]

    def counts_E(self) -> torch.Tensor:
        """Tokens routed to each expert (every top-k selection counts, as in M-SMoE for top-k models)."""
        ids = self.expert_ids_TK[self.expert_ids_TK >= 0]
        return torch.bincount(ids, minlength=self.num_experts).float()

    def frequency_E(self) -> torch.Tensor:
        """Routing frequencies normalised to sum to 1 over the layer's experts."""
        c = self.counts_E()
        return c / c.sum().clamp_min(1.0)

    def importance_E(self) -> torch.Tensor:
        """DERN's ``s_i = mean_x 1[i ∈ topk(x)] g_i(x)``: how often and how strongly each expert is chosen."""
        s = torch.zeros(self.num_experts)
        valid = self.expert_ids_TK >= 0
        s.index_add_(0, self.expert_ids_TK[valid], self.weights_TK[valid].float())
        return s / max(self.x_TD.shape[0], 1)

    def tokens_of(self, e: int, cap: int | None = None) -> torch.Tensor:
        """The inputs routed to expert ``e`` (first ``cap`` of them when given)."""
        rows = (self.expert_ids_TK == e).any(dim=1).nonzero().flatten()
        if cap is not None:
            rows = rows[:cap]
        return self.x_TD[rows]


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(name, layer)`` of every :class:`MoE` in ``model`` (a LanguageModel, or a patched transformers model)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def run_model(model: nn.Module, tokens_BS: torch.Tensor):
    """One forward pass: ``model(tokens)`` for moekit models, ``model(input_ids=tokens)`` for transformers
    (its output object is returned as is: calibration only needs the hooks to fire)."""
    from ..models import LanguageModel
    if isinstance(model, LanguageModel):
        return model(tokens_BS)[0]
    return model(input_ids=tokens_BS)


def check_calibration(tokens_NS: torch.Tensor, min_tokens: int = 64) -> torch.Tensor:
    tokens_NS = torch.as_tensor(tokens_NS)
    if tokens_NS.dim() == 1:
        tokens_NS = tokens_NS[None]
    if tokens_NS.dim() != 2 or tokens_NS.dtype not in (torch.int64, torch.int32):
        raise CompressionError(f"calibration must be integer token ids of shape [sequences, length], got "
                               f"{tuple(tokens_NS.shape)} {tokens_NS.dtype}; tokenize the calibration text first")
    if tokens_NS.numel() < min_tokens:
        raise CompressionError(f"calibration holds {tokens_NS.numel()} tokens, fewer than the {min_tokens} "
                               f"needed; give more calibration text (e.g. --calibration-tokens {min_tokens * 16})")
    return tokens_NS.long()


@torch.no_grad()
def calibrate(model: nn.Module, tokens_NS: torch.Tensor, *, batch_size: int = 8,
              layers: Iterable[str] | None = None) -> dict[str, LayerRecord]:
    """Run ``model`` over ``tokens_NS`` and return ``{layer name: LayerRecord}`` for its MoE layers."""
    tokens_NS = check_calibration(tokens_NS, min_tokens=1)
    found = find_moe_layers(model)
    wanted = set(layers) if layers is not None else {name for name, _ in found}
    parts: dict[str, list] = {name: [] for name, _ in found if name in wanted}
    handles = []
    for name, moe in found:
        if name not in wanted:
            continue

        def hook(module, args, routing, name=name):
            parts[name].append((args[0].detach().float().cpu(), routing.expert_ids_TK.cpu(),
                                routing.weights_TK.detach().float().cpu(), routing.logits_TE.detach().float().cpu()))
        handles.append(moe.router.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, tokens_NS.shape[0], batch_size):
            run_model(model, tokens_NS[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: LayerRecord(name, *(torch.cat(t) for t in zip(*chunks))) for name, chunks in parts.items()}
