"""A decoder-only language model with a per-layer choice of dense or MoE feed-forward.

Dim legend: B batch, S sequence, D model dim, V vocabulary.

Each block is pre-norm (RMSNorm, Zhang & Sennrich 2019)::

    h = x + Attention(norm(x), ctx)       causal, rotary positions; dense or a variant via build_attention
    y = h + FFN(norm(h), ctx)             dense SwiGLU (Shazeer 2020) or MoE / variant via build_ffn

Every sparse FFN is built through :func:`moekit.layers.build_ffn` under the name ``layers.{i}.ffn`` and is
called as ``ffn(h, ctx)``; every attention is built through :func:`moekit.layers.build_attention`
(``model.attention``, ``dense`` by default) under ``layers.{i}.attn`` and is called with ``ctx=ctx``; so their
losses and statistics land in the :class:`~moekit.RoutingContext` the forward returns. The model is readable in
one sitting, in the manner of nanoGPT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigError
from ..experts import FeedForward
from ..layers import build_attention, build_ffn
from ..layers.variants import LayerPathRouters, TokenPruner
from ..types import MODALITY_KEY, RoutingContext
from .attention import KVCache, rope_tables
from .config import ModelConfig
from .depth import build_depth_router, build_planner, positions_rope

__all__ = ["LanguageModel", "Block"]


def _ffn_output(out) -> torch.Tensor:
    """FFNs return a tensor; tolerate ``(y, extra)`` tuples and objects with an ``out`` field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.out


class Block(nn.Module):
    """One transformer block; ``ffn`` is dense or sparse according to the config's layer layout."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = build_attention(config.attention, config.attention_options, dim=config.dim,
                                    num_heads=config.num_heads, num_layers=config.num_layers,
                                    context=config.context, layer_index=index, name=f"layers.{index}.attn")
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.is_sparse = config.is_sparse(index)
        if self.is_sparse:
            assert config.moe is not None  # ModelConfig makes a layer sparse only with an MoE config
            self.ffn = build_ffn(config.ffn, config.moe, config.variant, layer_index=index,
                                 num_layers=config.num_layers, name=f"layers.{index}.ffn")
        else:
            self.ffn = FeedForward(config.dim, config.resolved_dense_hidden_dim, "swiglu")
        if getattr(self.ffn, "reads_attention", False):  # e.g. GMoE's attention-aware routing
            if not hasattr(self.attn, "publish_probs"):
                raise ConfigError(f"model.ffn={config.ffn!r} routes from the attention probabilities, which "
                                  f"model.attention={config.attention!r} does not publish; use "
                                  f"model.attention='dense' or variant.similarity='learned'")
            setattr(self.attn, "publish_probs", True)  # noqa: B010 (a Module attribute mypy cannot see)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, ctx: RoutingContext,
                cache: KVCache | None = None) -> torch.Tensor:
        return x_BSD + self.delta(x_BSD, cos_SR, sin_SR, ctx, cache)

    def delta(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, ctx: RoutingContext,
              cache: KVCache | None = None) -> torch.Tensor:
        """The block's update without its outer residual: ``block(x) = x + delta(x)``.

        A feed-forward with ``block_residual = False`` (Chain-of-Experts without an outer residual) replaces
        the block's hidden state instead of adding to it.
        """
        a_BSD = self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR, cache, self.index, ctx=ctx)
        h_BSD = x_BSD + a_BSD
        f_BSD = _ffn_output(self.ffn(self.ffn_norm(h_BSD), ctx))
        if getattr(self.ffn, "block_residual", True):
            return a_BSD + f_BSD
        return f_BSD - x_BSD


class LanguageModel(nn.Module):
    """Decoder-only LM: token embedding, blocks, final RMSNorm, output projection (tied by default).

    Args:
        config: the :class:`ModelConfig`.
    """

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        if config.tie_embeddings:
            self.register_module("head", None)
        else:
            self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=config.dim**-0.5)
        self.depth_router = build_depth_router(config.depth_routing, config.dim, config.num_layers)
        if getattr(self.depth_router, "reads_attention", False):  # FTP's attention-score feature
            for block in self.layers:
                if not hasattr(block.attn, "publish_probs"):
                    raise ConfigError(f"model.depth_routing.kind={config.depth_routing['kind']!r} reads the "
                                      f"attention probabilities, which model.attention={config.attention!r} does "
                                      f"not publish; use model.attention='dense'")
                block.attn.publish_probs = True
        self.planner = build_planner(config.ffn, config.moe, config.variant, config.num_layers)
        cos, sin = rope_tables(config.context, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def sparse_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, ffn)`` of the MoE / variant layers, in depth order."""
        return [(f"layers.{b.index}.ffn", b.ffn) for b in self.layers if isinstance(b, Block) and b.is_sparse]

    @property
    def supports_kv_cache(self) -> bool:
        """Depth routing and Read-ME planning look at the whole sequence, so they run without a KV cache; so
        does an attention variant whose module says ``supports_kv_cache = False``."""
        return (self.depth_router is None and self.planner is None
                and all(getattr(b.attn, "supports_kv_cache", False) for b in self.layers))

    def new_cache(self, batch: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_heads, c.context, c.head_dim,
                       dtype=self.embed.weight.dtype, device=self.embed.weight.device)

    def forward(self, tokens_BS: torch.Tensor, ctx: RoutingContext | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, RoutingContext]:
        """Next-token logits ``[B, S, V]`` and the routing context holding the MoE losses and statistics.

        Args:
            tokens_BS: int64 token ids.
            ctx: created when not given; pass ``RoutingContext(collect_stats=True)`` for routing statistics.
            cache: a :class:`KVCache`; the tokens continue its positions, and it is advanced by ``S``.
        """
        B, S = tokens_BS.shape
        start = cache.length if cache is not None else 0
        if start + S > self.config.context:
            raise ValueError(f"{start + S} positions exceed model.context={self.config.context}; "
                             f"feed at most the last {self.config.context} tokens")
        if cache is not None and not self.supports_kv_cache:
            raise ValueError("this model routes over the whole sequence (depth routing, a Read-ME planner or an "
                             "attention variant without a KV cache), "
                             "so it cannot use a KV cache; generate without one (moekit sample --no-cache)")
        ctx = RoutingContext() if ctx is None else ctx
        if self.config.modality_starts and MODALITY_KEY not in ctx.state:  # early fusion: modality from the id
            starts = torch.tensor(self.config.modality_starts, device=tokens_BS.device)
            ctx.state[MODALITY_KEY] = torch.bucketize(tokens_BS.contiguous(), starts, right=True)
        cos_SR, sin_SR = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        if cache is not None and cache.pad_B is not None:  # left-padded rows: positions count from their text
            pos_BS = (start + torch.arange(S, device=tokens_BS.device) - cache.pad_B[:, None]).clamp_min(0)
            cos_SR, sin_SR = self.rope_cos[pos_BS], self.rope_sin[pos_BS]
        x_BSD = self.embed(tokens_BS)
        if self.planner is not None:
            self.planner(x_BSD, ctx)
        x_BSD = self._blocks(x_BSD, cos_SR, sin_SR, ctx, cache)
        if cache is not None:
            cache.length += S
        h_BSD = self.norm(x_BSD)
        weight_VD = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h_BSD, weight_VD), ctx

    def _blocks(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor, ctx: RoutingContext,
                cache: KVCache | None) -> torch.Tensor:
        """Run the blocks, through the depth router where the config asks for one (see :mod:`.depth`)."""
        router = self.depth_router
        if router is None:
            for block in self.layers:
                x_BSD = block(x_BSD, cos_SR, sin_SR, ctx, cache)
            return x_BSD
        if isinstance(router, TokenPruner):  # FTP: a token skips a block or takes its update
            return router(x_BSD, [lambda h, c, b=block: b.delta(h, cos_SR, sin_SR, c) for block in self.layers], ctx)
        if isinstance(router, LayerPathRouters):  # Dr.LLM: skip / execute / repeat each block per sequence
            return router(x_BSD, [lambda h, c, b=block: b(h, cos_SR, sin_SR, c) for block in self.layers], ctx)
        if isinstance(router, nn.ModuleDict):  # Mixture-of-Depths around some blocks
            for block in self.layers:
                mod = router[str(block.index)] if str(block.index) in router else None
                if mod is None:
                    x_BSD = block(x_BSD, cos_SR, sin_SR, ctx)
                else:
                    x_BSD = mod(x_BSD, lambda h, c, b=block: b.delta(h, *positions_rope(c, cos_SR, sin_SR), c), ctx)
            return x_BSD
        first, *middle, last = self.layers  # Mixture-of-Recursions: middle-cycle sharing

        def shared(h_BKD: torch.Tensor, c: RoutingContext) -> torch.Tensor:
            cos, sin = positions_rope(c, cos_SR, sin_SR)
            for block in middle:
                h_BKD = block(h_BKD, cos, sin, c)
            return h_BKD

        x_BSD = first(x_BSD, cos_SR, sin_SR, ctx)
        x_BSD = router(x_BSD, shared, ctx)
        return last(x_BSD, cos_SR, sin_SR, ctx)
