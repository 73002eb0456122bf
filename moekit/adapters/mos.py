"""MoS, Mixture of Shards (Wang et al., ICLR 2025; spec §19, [abs + reviews], sizes reconstructed).

Dim legend: I input features, O output features, R rank, L shards per vector, P pool vectors per shard part.

Every adapted layer builds its LoRA vectors from shards drawn from pools shared by all layers of the same shape
(inter-layer sharing) and from a private segment of its own (shard privatisation)::

    a_i = concat_{s<L} pool_A[s][idx_A(i, s)],   b_i = concat_{s<L} pool_B[s][idx_B(i, s)]     (vector sharding)
    dy = (alpha/r) B A x,   A = [a_1 .. a_R]^T  [R, I],   B = [b_1 .. b_R]  [O, R]

``pool_X[s]`` is the concatenation of the shared public part ``[P_pub, I/L]`` and the layer's private part
``[P_priv, I/L]``. The indices are random and fixed at initialisation (the "MoE-like" subset selection),
drawn independently for A and B (pair dissociation), saved with the adapter. Choices made (the paper does not
give them): ``num_shards`` L = 2, ``public_size`` = 2 R vectors per shard part, ``private_size`` = R / 2, and the
first ``private_size`` ranks of every shard part take their shard from the private segment, the others from the
public pool. Pools start like LoRA: A shards Kaiming-uniform, B shards zero. ΔW is linear, so ``merge()`` works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configs import check
from ..types import RoutingContext
from .core import LinearAdapter
from .lora import kaiming_rows

__all__ = ["MoS", "MoSConfig", "MoSPool"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoSConfig:
    """Attributes: rank R, alpha, num_shards L (must divide I and O), public_size (shared vectors per shard part;
    None = 2 R), private_size (each layer's own vectors per shard part; None = R // 2, at most R)."""

    rank: int = 8
    alpha: float = 16.0
    num_shards: int = 2
    public_size: int | None = None
    private_size: int | None = None

    def __post_init__(self) -> None:
        check(isinstance(self.rank, int) and self.rank >= 1, f"mos.rank={self.rank!r} must be a positive integer")
        check(self.alpha > 0, f"mos.alpha={self.alpha} must be positive")
        check(isinstance(self.num_shards, int) and self.num_shards >= 1,
              f"mos.num_shards={self.num_shards!r} must be a positive integer")
        check(self.private_size is None or 0 <= self.private_size <= self.rank,
              f"mos.private_size={self.private_size} must be in [0, rank={self.rank}]")
        check(self.public_size is None or self.public_size >= 0, f"mos.public_size={self.public_size} must be >= 0")
        check(self.resolved_public > 0 or self.resolved_private == self.rank,
              "mos: with public_size=0 every rank needs a private shard; set private_size=rank")

    @property
    def resolved_public(self) -> int:
        return 2 * self.rank if self.public_size is None else self.public_size

    @property
    def resolved_private(self) -> int:
        return self.rank // 2 if self.private_size is None else self.private_size


class MoSPool(nn.Module):
    """The public shard pools of one adapted shape, shared by every layer of that shape."""

    def __init__(self, in_features: int, out_features: int, config: MoSConfig) -> None:
        super().__init__()
        L, P = config.num_shards, config.resolved_public
        self.pool_A = nn.Parameter(kaiming_rows(P, in_features // L, L) * L**-0.5)
        self.pool_B = nn.Parameter(torch.zeros(L, P, out_features // L))


class MoS(LinearAdapter):
    """LoRA whose vectors are concatenations of shared and private shards."""

    index_A: torch.Tensor
    index_B: torch.Tensor

    def __init__(self, in_features: int, out_features: int, config: MoSConfig, pool: MoSPool) -> None:
        super().__init__()
        c, L = config, config.num_shards
        if in_features % L or out_features % L:
            raise ValueError(f"mos.num_shards={L} must divide the adapted layer's input ({in_features}) and output "
                             f"({out_features}) features; choose a common divisor")
        self.config, self.in_features, self.out_features = c, in_features, out_features
        self.scale = c.alpha / c.rank
        self.pool = pool
        V = c.resolved_private
        self.private_A = nn.Parameter(kaiming_rows(V, in_features // L, L) * L**-0.5)
        self.private_B = nn.Parameter(torch.zeros(L, V, out_features // L))
        self.register_buffer("index_A", self._indices(c), persistent=True)
        self.register_buffer("index_B", self._indices(c), persistent=True)

    @staticmethod
    def _indices(c: MoSConfig) -> torch.Tensor:
        """``[L, R]`` indices into ``concat(public, private)``: ranks below ``private_size`` use a private shard
        (a random permutation of the private segment), the others a random public one."""
        L, R, P, V = c.num_shards, c.rank, c.resolved_public, c.resolved_private
        out = torch.empty(L, R, dtype=torch.long)
        for s in range(L):
            out[s, :V] = P + torch.randperm(max(V, 1))[:V]
            out[s, V:] = torch.randint(0, max(P, 1), (R - V,))
        return out

    def _gather(self, public: torch.Tensor, private: torch.Tensor, index_LR: torch.Tensor) -> torch.Tensor:
        pool_LPd = torch.cat([public, private], dim=1)
        shards_LRd = pool_LPd.gather(1, index_LR.unsqueeze(-1).expand(-1, -1, pool_LPd.shape[-1]))
        return shards_LRd.permute(1, 0, 2).reshape(index_LR.shape[1], -1)  # [R, L * d]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [R, I], B [O, R])``."""
        A_RI = self._gather(self.pool.pool_A, self.private_A, self.index_A)
        B_RO = self._gather(self.pool.pool_B, self.private_B, self.index_B)
        return A_RI, B_RO.T

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "mos") -> torch.Tensor:
        A_RI, B_OR = self.factors()
        return (x_TI.to(A_RI.dtype) @ A_RI.T) @ B_OR.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        A_RI, B_OR = self.factors()
        return self.scale * B_OR @ A_RI

    def structure(self) -> dict[str, Any]:
        return {}


def pool_for(session, in_features: int, out_features: int, config: MoSConfig) -> MoSPool:
    """The public pool of this shape in this model (created by the first layer that asks)."""
    pools = session.shared.setdefault("mos", {})
    key = (in_features, out_features)
    if key not in pools:
        pools[key] = MoSPool(in_features, out_features, config)
    return pools[key]
