"""Routing Transformer: content-based sparse attention through online k-means (Roy et al. 2021, arXiv 2003.05997;
read from lucidrains/routing-transformer, the official code being TensorFlow).

Dim legend: B batch, S sequence, D model dim, H heads, Dh head dim, C clusters (centroids) per head, W members
per cluster, R rotary frequencies.

Per routing head (architectures.md §20)::

    q~ = LayerNorm(q), k~ = LayerNorm(k)          no scale or bias: routing on a sphere-like set
    cluster c takes its top-W queries and its top-W keys by dot product with the centroid mu_c  (W = ceil(S / C))
    within each cluster: causal softmax attention (mask by original position), outputs scattered back;
    a query in several clusters gets the mean of its clusters' outputs, one in none gets 0
    centroids, no gradient: mu_c <- lam mu_c + (1 - lam)/2 mean(q~ nearest to c) + (1 - lam)/2 mean(k~ nearest to c)
    commitment loss (lucidrains): coef * MSE(q~, k~ vs their nearest centroid), coef 1e-4

Heads ``0 .. local_heads-1`` use local (sliding-window, ``local_window``) causal attention instead, as the
paper mixes local and routing heads; ``local_heads = num_heads`` gives a pure local-attention model.

Choices: the centroid update is accumulated by training forwards (detached) and applied by ``on_step`` after the
optimizer step (the trainer's step hook), never inside ``forward`` (DESIGN: state updates are explicit);
clusters with no member keep their centroid; updated centroids are renormalised to norm sqrt(Dh) (the scale of a
layer-normalised vector). Attention scores use the rotated (RoPE) q and k; the routing uses q~, k~ before rotation.
Empty query rows (no earlier key in the cluster) give 0. No KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check
from ...types import Routing, RoutingContext
from ..variants._common import record_stats
from .registry import parse_attention_options, register_attention
from .rope import apply_rope

__all__ = ["RoutingAttention", "RoutingAttentionConfig", "cluster_attention", "local_attention"]

P = "attention_options"


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingAttentionConfig:
    """Attributes:
        num_clusters: centroids C per head; ``None``: ``round(sqrt(model.context))`` (the paper's C ~ sqrt(n)).
        local_heads: heads that use sliding-window attention instead of routing (0 .. num_heads).
        local_window: how many positions (itself included) a local head sees.
        ema_decay: lambda of the centroid EMA (0.999 in the paper).
        commitment_coef: weight of the commitment loss (lucidrains 1e-4; 0: off).
    """

    num_clusters: int | None = None
    local_heads: int = 0
    local_window: int = 16
    ema_decay: float = 0.999
    commitment_coef: float = 1e-4

    def __post_init__(self) -> None:
        check(self.num_clusters is None or (isinstance(self.num_clusters, int) and self.num_clusters >= 1),
              f"{P}.num_clusters={self.num_clusters!r} must be a positive integer or left out (sqrt(context))")
        check(isinstance(self.local_heads, int) and self.local_heads >= 0,
              f"{P}.local_heads={self.local_heads!r} must be an integer >= 0")
        check(isinstance(self.local_window, int) and self.local_window >= 1,
              f"{P}.local_window={self.local_window!r} must be a positive integer")
        check(0.0 <= self.ema_decay < 1.0, f"{P}.ema_decay={self.ema_decay} must be in [0, 1) (paper: 0.999)")
        check(self.commitment_coef >= 0, f"{P}.commitment_coef={self.commitment_coef} must be >= 0 (0: off)")


def cluster_attention(q_BHSd, k_BHSd, v_BHSd, route_q_BHSd, route_k_BHSd, centroids_HCd, width: int):
    """Balanced clustered causal attention: ``(out_BHSd, members_q_BHCW)``.

    Cluster ``c`` gathers the ``width`` queries and keys of highest dot product with its centroid; attention runs
    within the cluster with the causal mask of the original positions; each query's output is the mean over the
    clusters it belongs to (0 when none, or when no key of its clusters precedes it).
    """
    B, H, S, Dh = q_BHSd.shape
    ids_q = torch.einsum("bhsd,hcd->bhcs", route_q_BHSd, centroids_HCd).topk(width, dim=-1).indices  # [B,H,C,W]
    ids_k = torch.einsum("bhsd,hcd->bhcs", route_k_BHSd, centroids_HCd).topk(width, dim=-1).indices

    def gather(x_BHSd, ids_BHCW):
        return x_BHSd.gather(2, ids_BHCW.flatten(2)[..., None].expand(-1, -1, -1, Dh)).unflatten(2, ids_BHCW.shape[2:])

    q, k, v = gather(q_BHSd, ids_q), gather(k_BHSd, ids_k), gather(v_BHSd, ids_k)  # [B,H,C,W,Dh]
    visible = ids_k[..., None, :] <= ids_q[..., :, None]  # [B,H,C,Wq,Wk]
    scores = torch.einsum("bhcqd,bhckd->bhcqk", q, k) / math.sqrt(Dh)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # rows with no key: 0
    out = torch.einsum("bhcqk,bhckd->bhcqd", probs, v)
    flat = ids_q.flatten(2)  # [B,H,C*W]
    total = torch.zeros_like(q_BHSd).scatter_add(2, flat[..., None].expand(-1, -1, -1, Dh), out.flatten(2, 3))
    hits = torch.zeros(B, H, S, device=q_BHSd.device, dtype=q_BHSd.dtype).scatter_add(
        2, flat, torch.ones_like(flat, dtype=q_BHSd.dtype))
    return total / hits.clamp_min(1)[..., None], ids_q


def local_attention(q_BHSd, k_BHSd, v_BHSd, window: int) -> torch.Tensor:
    """Causal sliding-window attention: position ``i`` sees ``i - window < j <= i``."""
    S = q_BHSd.shape[2]
    pos = torch.arange(S, device=q_BHSd.device)
    mask_SS = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
    return F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask_SS)


class RoutingAttention(nn.Module):
    """Routing (and local) attention heads: ``forward(x_BSD, cos_SR, sin_SR, cache=None, layer=0, ctx=None)``."""

    supports_kv_cache = False
    centroids_HCd: torch.Tensor

    def __init__(self, dim: int, num_heads: int, num_layers: int, context: int,
                 config: RoutingAttentionConfig | None = None, name: str = "routing_attention") -> None:
        super().__init__()
        self.config, self.name = config or RoutingAttentionConfig(), name
        check(self.config.local_heads <= num_heads,
              f"{P}.local_heads={self.config.local_heads} exceeds model.num_heads={num_heads}; lower local_heads")
        C = self.config.num_clusters or max(1, round(math.sqrt(context)))
        self.num_heads, self.head_dim, self.num_clusters = num_heads, dim // num_heads, C
        self.w_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.w_out = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.w_qkv.weight, std=dim**-0.5)
        nn.init.normal_(self.w_out.weight, std=dim**-0.5 / (2 * num_layers) ** 0.5)
        routed = num_heads - self.config.local_heads
        init = F.normalize(torch.randn(routed, C, self.head_dim), dim=-1) * self.head_dim**0.5
        self.register_buffer("centroids_HCd", init)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (sum of members, counts) since last step

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, cache=None, layer: int = 0,
                ctx: RoutingContext | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("routing attention has no KV cache; generate without one (moekit sample --no-cache)")
        B, S, D = x_BSD.shape
        H, Dh, L = self.num_heads, self.head_dim, self.config.local_heads
        q, k, v = self.w_qkv(x_BSD).view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
        rq, rk = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        parts = []
        if L > 0:
            parts.append(local_attention(rq[:, :L], rk[:, :L], v[:, :L], self.config.local_window))
        if L < H:
            route_q = F.layer_norm(q[:, L:].float(), (Dh,))
            route_k = F.layer_norm(k[:, L:].float(), (Dh,))
            width = min(S, -(-S // self.num_clusters))
            out, _ = cluster_attention(rq[:, L:], rk[:, L:], v[:, L:], route_q, route_k,
                                       self.centroids_HCd.to(route_q.dtype), width)
            parts.append(out)
            self._routing_side_effects(route_q, route_k, ctx)
        y_BHSd = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.w_out(y_BHSd.transpose(1, 2).reshape(B, S, D))

    def _routing_side_effects(self, route_q: torch.Tensor, route_k: torch.Tensor, ctx: RoutingContext | None) -> None:
        """Nearest centroids: EMA accumulation (training), commitment loss and statistics (with a context)."""
        mu = self.centroids_HCd
        C = self.num_clusters
        near_q = torch.einsum("bhsd,hcd->bhsc", route_q.detach(), mu).argmax(-1)  # [B,H,S]
        near_k = torch.einsum("bhsd,hcd->bhsc", route_k.detach(), mu).argmax(-1)
        if self.training:
            with torch.no_grad():
                sums, counts = [], []
                for x, near in ((route_q, near_q), (route_k, near_k)):
                    onehot = F.one_hot(near, C).to(x.dtype)  # [B,H,S,C]
                    sums.append(torch.einsum("bhsc,bhsd->hcd", onehot, x.detach()))
                    counts.append(onehot.sum((0, 2)))
                if self._pending is not None:
                    sums[0] = sums[0] + self._pending[0][0]
                    sums[1] = sums[1] + self._pending[0][1]
                    counts[0] = counts[0] + self._pending[1][0]
                    counts[1] = counts[1] + self._pending[1][1]
                self._pending = (torch.stack(sums), torch.stack(counts))
        if ctx is None:
            return
        if self.config.commitment_coef > 0:
            idx = torch.arange(mu.shape[0], device=mu.device)[None, :, None]
            loss = F.mse_loss(route_q, mu[idx, near_q]) + F.mse_loss(route_k, mu[idx, near_k])
            ctx.add_loss("routing_commitment_loss", self.config.commitment_coef * loss, layer=self.name)
        if ctx.collect_stats:
            Hr, T = near_q.shape[1], near_q.shape[0] * near_q.shape[2]
            ids_TN = (near_q + (torch.arange(Hr, device=mu.device) * C)[None, :, None]).permute(0, 2, 1).reshape(T, Hr)
            scores_TN = torch.ones(T, Hr * C, device=mu.device) / C
            record_stats(ctx, self.name, Routing(expert_ids_TK=ids_TN, weights_TK=torch.ones(T, Hr),
                                                 scores_TE=scores_TN, logits_TE=scores_TN),
                         clusters=float(C))

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        """Apply the EMA centroid update accumulated since the last optimizer step (the trainer's hook)."""
        if self._pending is None:
            return
        (sum_q, sum_k), (count_q, count_k) = self._pending
        self._pending = None
        lam, mu = self.config.ema_decay, self.centroids_HCd
        mean_q = sum_q / count_q.clamp_min(1)[..., None]
        mean_k = sum_k / count_k.clamp_min(1)[..., None]
        # a side with no member contributes the centroid itself; a cluster with no member at all stays put
        mean_q = torch.where(count_q[..., None] > 0, mean_q, mu)
        mean_k = torch.where(count_k[..., None] > 0, mean_k, mu)
        new = lam * mu + (1 - lam) / 2 * mean_q + (1 - lam) / 2 * mean_k
        mu.copy_(F.normalize(new, dim=-1) * self.head_dim**0.5)


@register_attention("routing")
def build_routing_attention(options: dict, *, dim: int, num_heads: int, num_layers: int, context: int,
                            layer_index: int, name: str) -> nn.Module:
    return RoutingAttention(dim, num_heads, num_layers, context,
                            parse_attention_options(RoutingAttentionConfig, options), name=name)
