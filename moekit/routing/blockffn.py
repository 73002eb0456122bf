"""BlockFFN router pieces (Song et al. 2025, arXiv 2507.08771, github thunlp/BlockFFN).

Dim legend: B batch, S sequence, E experts, T = B*S tokens.

- Router: ``r = ReLU(W_r x)`` (exact zeros = inactive experts), then ``A = RMSNorm(r)`` over the E scores with a
  learnable scale (or ``r / sum r`` for ``norm="sum"``).
- Activation-locality loss: ``BCE_with_logits(s * l_{t-1}, sigmoid(s * l_t))`` between consecutive tokens'
  pre-ReLU logits ``l`` (pairs never cross a sequence), steepness ``s = 100``; the target is not detached.
- Chunk sparsification loss: ``q_ti = r_ti / sum_j r_tj``, ``P_chunk,i = 1 - prod_{t in chunk}(1 - q_ti)``
  (1e-5 inside the log-product, as in the code), ``L_cs = mean_{chunks, i} P_chunk,i``: the expected size of the
  union of active experts over a chunk, divided by E.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["relu_router_weights", "locality_loss", "chunk_sparsity_loss", "chunk_union_fraction"]


def relu_router_weights(logits_TE: torch.Tensor, scale_E: torch.Tensor | None, norm: str = "rmsnorm",
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_TE, A_TE)``: ReLU scores and the normalised combine weights (0 wherever ``r`` is 0)."""
    r_TE = F.relu(logits_TE)
    if norm == "sum":
        return r_TE, r_TE / r_TE.sum(-1, keepdim=True).clamp_min(eps)
    a_TE = r_TE * torch.rsqrt(r_TE.square().mean(-1, keepdim=True) + eps)
    return r_TE, a_TE * scale_E if scale_E is not None else a_TE


def locality_loss(logits_BSE: torch.Tensor, steepness: float = 100.0) -> torch.Tensor:
    """Unweighted activation-locality loss between consecutive tokens of each sequence."""
    if logits_BSE.shape[1] < 2:
        return logits_BSE.sum() * 0
    prev, cur = steepness * logits_BSE[:, :-1], steepness * logits_BSE[:, 1:]
    return F.binary_cross_entropy_with_logits(prev, torch.sigmoid(cur))


def _chunks(q_BSE: torch.Tensor, chunk_len: int) -> torch.Tensor:
    B, S, E = q_BSE.shape
    pad = (-S) % chunk_len
    if pad:
        q_BSE = torch.cat([q_BSE, q_BSE.new_zeros(B, pad, E)], 1)
    return q_BSE.view(B, -1, chunk_len, E)


def chunk_sparsity_loss(q_BSE: torch.Tensor, chunk_len: int = 64, eps: float = 1e-5) -> torch.Tensor:
    """Unweighted chunk sparsification loss from the per-token distributions ``q`` (rows sum to 1 or 0).
    A ragged last chunk is zero-padded (padding contributes no activation)."""
    q_BCLE = _chunks(q_BSE, chunk_len)
    p_BCE = 1 - torch.exp(torch.log(1 - q_BCLE + eps).sum(2))
    return p_BCE.mean()


def chunk_union_fraction(active_BSE: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Mean fraction of experts active anywhere in a chunk (1 - chunk-level sparsity)."""
    return _chunks(active_BSE.float(), chunk_len).amax(2).mean()
