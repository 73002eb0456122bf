"""Attention registry: how a model builds the attention of each block by name (mirrors the FFN registry).

A builder is ``fn(options: dict, *, dim: int, num_heads: int, num_layers: int, context: int, layer_index: int,
name: str) -> nn.Module`` returning a module with::

    forward(x_BSD, cos_SR, sin_SR, cache=None, layer=0, ctx=None) -> y_BSD

(``cos_SR, sin_SR``: the rotary tables of the positions, ``[S, R]`` or per sequence ``[B, S, R]``; ``cache``: a
KV cache, only for modules whose ``supports_kv_cache`` is True; ``ctx``: the :class:`~moekit.RoutingContext`
that collects the module's losses and statistics). ``options`` are the variant's own settings, validated by the
builder into its config dataclass so that errors name ``attention_options.<key>``. The model config names the
kind with ``attention = "switchhead"`` and sets it with ``--model.attention_options.num_experts=4``; the dense
multi-head attention is registered as ``"dense"`` by :mod:`moekit.models.attention`.

A feed-forward that routes from the attention pattern (GMoE's attention-aware mode) says
``reads_attention = True``; the block then sets ``publish_probs = True`` on its attention module, which writes
its head-wise probabilities ``[B, H, S, P]`` to ``ctx.state[ATTENTION_PROBS_KEY]`` on every forward. An attention
kind without a ``publish_probs`` attribute cannot feed such a feed-forward (the model says so when built).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ...configs import ConfigError, from_dict

ATTENTION_PROBS_KEY = "attention.probs"  # ctx.state: [B, H, S, P] probabilities of the block's attention

__all__ = [
    "ATTENTION_BUILDERS",
    "ATTENTION_PROBS_KEY",
    "build_attention",
    "check_attention_kind",
    "parse_attention_options",
    "register_attention",
]

AttentionBuilder = Callable[..., nn.Module]
ATTENTION_BUILDERS: dict[str, AttentionBuilder] = {}
OPTIONS_PREFIX = "attention_options"


def register_attention(name: str):
    """Decorator registering an attention builder under ``name``."""

    def wrap(fn: AttentionBuilder) -> AttentionBuilder:
        ATTENTION_BUILDERS[name] = fn
        return fn

    return wrap


def check_attention_kind(kind: str) -> None:
    """Raise :class:`ConfigError` naming ``model.attention`` when ``kind`` is not registered."""
    if kind not in ATTENTION_BUILDERS:
        close = difflib.get_close_matches(kind, list(ATTENTION_BUILDERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.attention={kind!r} is not an attention kind{hint}; "
                          f"available: {sorted(ATTENTION_BUILDERS)}")


def build_attention(kind: str, options: dict | None = None, *, dim: int, num_heads: int, num_layers: int,
                    context: int, layer_index: int = 0, name: str = "attn") -> nn.Module:
    """Build the attention module ``kind`` for one block."""
    check_attention_kind(kind)
    return ATTENTION_BUILDERS[kind](dict(options or {}), dim=dim, num_heads=num_heads, num_layers=num_layers,
                                    context=context, layer_index=layer_index, name=name)


def parse_attention_options(cls, options: dict):
    """The attention variant's config dataclass from ``model.attention_options`` (errors name the key)."""
    return from_dict(cls, dict(options or {}), prefix=OPTIONS_PREFIX)
