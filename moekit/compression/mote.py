"""MoTE: Mixture of Ternary Experts (arXiv 2506.14435; spec §6), upcycled from a dense model and trained with
quantisation-aware training through the trainer's :func:`~moekit.training.train_step`.

Dim legend: T tokens, D model dim, F hidden dim, E experts.

Each dense FFN becomes ``y = FFN_shared(x) + Σ_{i ∈ top-1} g_i(x) · E_i^tern(x)``: the pretrained FFN stays as a
frozen full-precision shared expert, and E routed experts, initialised from it (sparse upcycling), run with
ternary weights. Quantisation-aware training uses straight-through estimators: weights
``W̃ = clip(round(W / (mean|W| + ε)), −1, 1) · (mean|W| + ε)`` (BitNet b1.58's absmean, one scale per expert
matrix *(granularity not confirmed by the paper; our choice)*), activations int8 per token (absmax). The router
is top-1 with the P2 load-balancing loss; while upcycling only the routers and ternary experts train (attention,
norms, embeddings and the shared FFN are frozen).

Not done: saving a MoTE model as a run folder (its experts would be stored as a ``ternary`` bank).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import ExpertBank, FeedForward
from ..experts.activations import hidden
from ..layers.moe import routing_stats
from ..routing import Router, RouterConfig
from ..types import RoutingContext

__all__ = ["MoTE", "act_quant_int8", "mote_qat", "ternary_ste", "upcycle_to_mote"]

EPS = 1e-5


def ternary_ste(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternarisation with a straight-through (identity) backward."""
    s = w.abs().mean() + EPS
    q = torch.clamp(torch.round(w / s), -1, 1) * s
    return w + (q - w).detach()


def act_quant_int8(x_TD: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantisation with a straight-through backward."""
    s = 127.0 / x_TD.abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    q = torch.clamp(torch.round(x_TD * s), -128, 127) / s
    return x_TD + (q - x_TD).detach()


class MoTE(nn.Module):
    """A frozen full-precision shared FFN plus top-1 routed ternary experts; ``forward(x, ctx=None)``."""

    def __init__(self, shared: FeedForward, num_experts: int, *, router: RouterConfig | None = None,
                 name: str = "mote") -> None:
        super().__init__()
        self.name = name
        self.shared = shared
        for p in self.shared.parameters():
            p.requires_grad_(False)
        D, F_ = shared.dim, shared.hidden_dim
        self.router = Router(D, num_experts, 1, router or RouterConfig(aux_loss_coef=0.01))
        self.experts = ExpertBank(num_experts, D, F_, shared.activation)
        with torch.no_grad():  # sparse upcycling: every expert starts as the dense FFN
            for m in ("w_gate", "w_up", "w_down"):
                p = getattr(self.experts, m)
                if p is not None:
                    p.copy_(getattr(shared, m).detach().expand_as(p))

    def ternary_weights(self, e: int) -> dict[str, torch.Tensor]:
        return {m: ternary_ste(getattr(self.experts, m)[e]) for m in ("w_gate", "w_up", "w_down")
                if getattr(self.experts, m) is not None}

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, ctx, layer=self.name, num_sequences=x.shape[0] if x.dim() == 3 else 1)
        y_TD = self.shared(x_TD)
        xq_TD = act_quant_int8(x_TD)
        ids_T, g_T = routing.expert_ids_TK[:, 0], routing.weights_TK[:, 0].to(x.dtype)
        for e in range(self.experts.num_experts):
            rows = (ids_T == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            w = self.ternary_weights(e)
            xe = xq_TD[rows]
            h_gate = F.linear(xe, w["w_gate"]) if "w_gate" in w else None
            out = F.linear(act_quant_int8(hidden(self.experts.activation, h_gate, F.linear(xe, w["w_up"]))),
                           w["w_down"])
            y_TD = y_TD.index_add(0, rows, g_T[rows, None] * out)
        if ctx is not None and ctx.collect_stats:
            ctx.add_stats(self.name, routing_stats(routing))
        return y_TD.view(x.shape)


def upcycle_to_mote(model: nn.Module, num_experts: int, *, router: RouterConfig | None = None) -> nn.Module:
    """Replace every dense :class:`FeedForward` block FFN of a LanguageModel by a :class:`MoTE` (in place) and
    freeze everything but the routers and ternary experts."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for block in getattr(model, "layers", []):
        if isinstance(block.ffn, FeedForward):
            block.ffn = MoTE(copy.deepcopy(block.ffn), num_experts, router=router, name=f"layers.{block.index}.ffn")
            found += 1
    if not found:
        from .calibrate import CompressionError
        raise CompressionError("MoTE upcycles dense FFN layers and this model has none; train a dense run "
                               "(moekit train --preset dense) first")
    return model


def mote_qat(run_dir, num_experts: int = 4, *, steps: int = 50, lr: float = 1e-3) -> tuple[nn.Module, list[dict]]:
    """Upcycle a dense run to MoTE and train it with QAT for ``steps`` trainer steps; ``(model, metrics)``."""
    from ..data import load_data
    from ..training import load_run, train_step
    cfg, model, _ = load_run(run_dir, "cpu")
    upcycle_to_mote(model, num_experts)
    model.train()
    data = load_data(cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = [train_step(model, opt, data, cfg, step, torch.device("cpu")) for step in range(steps)]
    return model.eval(), history
