"""M2R2's accelerated residual stream as an expert prefetcher (spec ``compression-adaptation-serving.md`` §9).

Dim legend: T tokens, D model dim, R accelerator rank, L offloaded MoE layers, N sequences, S sequence length,
K slots per token.

M2R2 adds a "fast" residual stream whose low-rank accelerator adapters ``A_ℓ`` are trained (base model frozen) so
that an early state already resembles a later one; for MoE ahead-of-time loading, the routers of the next layers
are applied to the fast state and their top-k experts are copied ahead. The spec is reconstructed from the
abstract and summaries, so these are *choices made*:

- one step ahead (Δ = 1, what :class:`~moekit.serving.offload.Offload` prefetches): the fast state for layer
  ``ℓ + 1`` is ``x̂_TD = x_TD + (x_TD V_ℓ) U_ℓ``, where ``x_TD`` is layer ℓ's MoE input (the normalised residual
  stream the router reads) and ``V_ℓ`` ``[D, R]``, ``U_ℓ`` ``[R, D]``; the base block's own update ``f_ℓ`` is not
  re-run on the fast stream (it would cost a second forward pass), so the adapter learns the whole step;
- ``U`` starts at zero: with zero adapters the fast stream *is* the slow stream, and the prefetcher is exactly
  the ``router`` prefetcher (the next router on the current input; a test);
- the loss is the spec's alignment term ``‖x̂ − x^{ℓ+1}‖²`` (normalised by ``‖x^{ℓ+1}‖²``) plus a routing term of
  our own, ``KL(softmax(router_{ℓ+1}(x^{ℓ+1})) ‖ softmax(router_{ℓ+1}(x̂)))``, since what the prefetcher needs is
  the next layer's expert ranking; ``kl_weight = 0`` gives the alignment loss alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MoE

__all__ = ["Accelerators", "collect_moe_inputs", "next_layer_recall", "train_accelerators"]


class Accelerators(nn.Module):
    """Low-rank accelerators ``x ↦ x + (x V_ℓ) U_ℓ`` for ``ℓ = 0 .. L−2`` (layer ℓ's input → layer ℓ+1's)."""

    def __init__(self, dim: int, num_layers: int, rank: int = 8, seed: int = 0) -> None:
        super().__init__()
        if num_layers < 2 or not 1 <= rank <= dim:
            raise ValueError(f"accelerators need num_layers >= 2 MoE layers (got {num_layers}) and 1 <= rank <= "
                             f"dim={dim} (got rank={rank}); lower rank or use the router prefetcher")
        g = torch.Generator().manual_seed(seed)
        self.v_LDR = nn.Parameter(torch.randn(num_layers - 1, dim, rank, generator=g) / dim ** 0.5)
        self.u_LRD = nn.Parameter(torch.zeros(num_layers - 1, rank, dim))

    @property
    def num_layers(self) -> int:
        return self.v_LDR.shape[0] + 1

    def forward(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor:
        """The fast state predicting layer ``layer + 1``'s MoE input from layer ``layer``'s."""
        v, u = self.v_LDR[layer].to(x_TD.dtype), self.u_LRD[layer].to(x_TD.dtype)
        return x_TD + (x_TD @ v) @ u


@torch.no_grad()
def collect_moe_inputs(model: nn.Module, moes: Sequence[MoE], tokens_NS: torch.Tensor,
                       batch_size: int = 8) -> list[torch.Tensor]:
    """Each MoE layer's input ``[N·S, D]`` (what its router reads) on ``tokens_NS``, the model frozen."""
    store: list[list[torch.Tensor]] = [[] for _ in moes]

    def hook(i: int) -> Callable:
        def pre(_module: nn.Module, args: tuple) -> None:
            store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(moes)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, tokens_NS.shape[0], batch_size):
            model(tokens_NS[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(parts) for parts in store]


def _route_logits(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    return moe.route(x_TD).logits_TE.float()


def train_accelerators(model: nn.Module, moes: Sequence[MoE], tokens_NS: torch.Tensor, *, rank: int = 8,
                       steps: int = 200, lr: float = 3e-3, kl_weight: float = 1.0, batch_tokens: int = 512,
                       seed: int = 0) -> tuple[Accelerators, dict[str, float]]:
    """Train M2R2 accelerators on ``tokens_NS`` with the model frozen (see the module docstring for the loss).

    Returns the accelerators and ``{"loss_start", "loss_end"}`` (the loss on all collected tokens).
    """
    if steps < 0 or lr <= 0 or kl_weight < 0 or batch_tokens < 1:
        raise ValueError(f"need steps >= 0, lr > 0, kl_weight >= 0, batch_tokens >= 1 (got {steps}, {lr}, "
                         f"{kl_weight}, {batch_tokens})")
    xs = collect_moe_inputs(model, moes, tokens_NS)
    acc = Accelerators(xs[0].shape[1], len(moes), rank, seed)
    frozen = [(p, p.requires_grad) for m in moes for p in m.router.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(acc.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def loss_of(idx: torch.Tensor | None) -> torch.Tensor:
        total = torch.zeros(())
        for layer in range(len(moes) - 1):
            x, y = (xs[layer], xs[layer + 1]) if idx is None else (xs[layer][idx], xs[layer + 1][idx])
            fast = acc(layer, x)
            total = total + (fast - y).square().sum() / y.square().sum().clamp_min(1e-12)
            if kl_weight:
                want = F.log_softmax(_route_logits(moes[layer + 1], y), -1)
                got = F.log_softmax(_route_logits(moes[layer + 1], fast), -1)
                total = total + kl_weight * F.kl_div(got, want, log_target=True, reduction="batchmean")
        return total / (len(moes) - 1)

    try:
        with torch.no_grad():
            start = float(loss_of(None))
        for _ in range(steps):
            idx = torch.randint(0, xs[0].shape[0], (min(batch_tokens, xs[0].shape[0]),), generator=g)
            opt.zero_grad()
            loss_of(idx).backward()
            opt.step()
        with torch.no_grad():
            end = float(loss_of(None))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    acc.requires_grad_(False)
    return acc, {"loss_start": start, "loss_end": end}


@torch.no_grad()
def next_layer_recall(moes: Sequence[MoE], xs: Sequence[torch.Tensor],
                      predictor: Callable[[int, torch.Tensor], torch.Tensor]) -> float:
    """Per-token recall of the next layer's top-k: ``|predicted ∩ actual| / |actual|`` over tokens and layers.

    ``predictor(layer, x_TD)`` gives the state the next layer's router is applied to (``lambda l, x: x`` is the
    router prefetcher; an :class:`Accelerators` is M2R2's).
    """
    hit = total = 0
    for layer in range(len(moes) - 1):
        actual_TK = moes[layer + 1].route(xs[layer + 1]).expert_ids_TK
        pred_TK = moes[layer + 1].route(predictor(layer, xs[layer])).expert_ids_TK
        valid_TK = actual_TK >= 0
        match_TK = (actual_TK[:, :, None] == pred_TK[:, None, :]).any(-1) & valid_TK
        hit += int(match_TK.sum())
        total += int(valid_TK.sum())
    return hit / total if total else 1.0
