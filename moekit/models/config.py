"""Configuration of the decoder-only language model (:class:`moekit.models.LanguageModel`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..configs import check, check_types
from ..layers import MoEConfig

__all__ = ["ModelConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A decoder-only transformer whose blocks use dense SwiGLU or MoE feed-forwards.

    Attributes:
        vocab_size: token vocabulary (256 for the byte-level corpora).
        dim: model dimension D.
        num_layers: transformer blocks.
        num_heads: attention heads; ``dim / num_heads`` is the head dimension (even, for rotary positions).
        context: longest sequence the model attends over (rotary tables and KV caches are this long).
        moe: the MoE feed-forward of the sparse layers; ``None`` makes every layer dense. Its ``dim`` must
            equal ``dim`` (the run-config loader fills it in when left out).
        ffn: feed-forward kind built by :func:`moekit.layers.build_ffn` for the sparse layers (``moe``, or a
            variant registered by name).
        variant: free options handed to that builder (e.g. ``{num_iterations = 2}`` for a variant).
        attention: attention kind of every block, built by :func:`moekit.layers.build_attention`: ``dense``
            (multi-head causal attention) or an attention variant registered by name (``switchhead``, ``mom``...).
        attention_options: the attention variant's own options (e.g. ``{num_experts = 4}``); its FFN
            counterpart is ``variant``.
        depth_routing: block-level routing, empty for none: ``{kind = "mod", every = 2, capacity = 0.125}``
            (Mixture-of-Depths), ``{kind = "mor", num_recursions = 3}`` (Mixture-of-Recursions with
            middle-cycle sharing) or ``{kind = "drllm"}`` (Dr.LLM layer routers); see :mod:`moekit.models.depth`.
        dense_hidden_dim: hidden size of the dense SwiGLU layers; ``None`` uses ``moe.active_hidden`` (equal
            active FLOPs to the sparse layers) when there is an MoE, else ``4 * dim``.
        modality_starts: early fusion of several modalities in one vocabulary: the first token id of each
            modality after the first (``[256]``: ids below 256 are text, from 256 image codes). The forward then
            writes each token's modality id to ``ctx.state["modality_ids"]`` (:data:`moekit.types.MODALITY_KEY`)
            for modality-aware layers (``ffn = "moma"``). Empty: one modality, nothing written.
        first_dense_layers: the first layers stay dense (DeepSeek-MoE keeps layer 0 dense).
        moe_every: after those, every ``moe_every``-th layer is sparse (1: all, 2: alternate, as in GShard).
        tie_embeddings: share the token embedding with the output projection (saves ``vocab * dim``).
        rope_theta: rotary base frequency.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 256
    dim: int
    num_layers: int
    num_heads: int
    context: int
    moe: MoEConfig | None = None
    ffn: str = "moe"
    variant: dict[str, Any] = field(default_factory=dict)
    attention: str = "dense"
    attention_options: dict[str, Any] = field(default_factory=dict)
    depth_routing: dict[str, Any] = field(default_factory=dict)
    dense_hidden_dim: int | None = None
    modality_starts: tuple[int, ...] = ()
    first_dense_layers: int = 0
    moe_every: int = 1
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_types(self, "model")
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "context", "moe_every"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"model.{name}={value!r} must be a positive integer")
        check(self.dim % self.num_heads == 0,
              f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}; "
              f"choose num_heads among the divisors of {self.dim}")
        check((self.dim // self.num_heads) % 2 == 0,
              f"head dimension dim/num_heads={self.dim // self.num_heads} must be even for rotary positions; "
              f"change model.num_heads")
        check(self.first_dense_layers >= 0,
              f"model.first_dense_layers={self.first_dense_layers} must be >= 0 (0: no leading dense layers)")
        check(self.dense_hidden_dim is None or self.dense_hidden_dim >= 1,
              f"model.dense_hidden_dim={self.dense_hidden_dim} must be a positive integer or none")
        check(isinstance(self.variant, dict), f"model.variant must be a table of options, got {self.variant!r}")
        check(isinstance(self.attention_options, dict),
              f"model.attention_options must be a table of options, got {self.attention_options!r}")
        from ..layers.attention import check_attention_kind
        check_attention_kind(self.attention)
        check(self.attention != "dense" or not self.attention_options,
              f"model.attention_options={self.attention_options!r} are set but model.attention='dense' takes no "
              f"options; remove them or choose an attention variant with model.attention")
        check(isinstance(self.depth_routing, dict),
              f"model.depth_routing must be a table of options, got {self.depth_routing!r}")
        starts = self.modality_starts
        check(all(isinstance(s, int) for s in starts)
              and all(a < b for a, b in zip([0, *starts], starts, strict=False))
              and all(s < self.vocab_size for s in starts),
              f"model.modality_starts={starts!r} must be increasing token ids in 1..vocab_size-1="
              f"{self.vocab_size - 1} (e.g. [256] for bytes then image codes); use [] for one modality")
        from .depth import validate_depth_routing
        validate_depth_routing(self.depth_routing, self.num_layers)
        check(not self.depth_routing.get("kv_sharing") or self.attention == "dense",
              f"model.depth_routing.kv_sharing=true reuses the dense attention's keys and values, which "
              f"model.attention={self.attention!r} does not share; use model.attention='dense' or kv_sharing=false")
        if self.moe is not None:
            check(self.moe.dim == self.dim,
                  f"model.moe.dim={self.moe.dim} differs from model.dim={self.dim}; set both to the same value")

    def is_sparse(self, layer_index: int) -> bool:
        """Whether block ``layer_index`` uses the ``ffn`` kind (MoE or variant) rather than a dense FFN."""
        if self.moe is None or layer_index < self.first_dense_layers:
            return False
        return (layer_index - self.first_dense_layers) % self.moe_every == 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def resolved_dense_hidden_dim(self) -> int:
        if self.dense_hidden_dim is not None:
            return self.dense_hidden_dim
        return self.moe.active_hidden if self.moe is not None else 4 * self.dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
