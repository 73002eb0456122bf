"""Feed-forward layer registry: how a model builds the FFN of each block by name.

A builder is ``fn(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module``
returning a module with ``forward(x_BSD, ctx=None) -> y_BSD``. ``options`` are the variant's own settings
(validated by the builder, e.g. with :func:`moekit.configs.from_dict` into its config dataclass), so that a
model config names a variant with ``ffn="coe"`` and sets it with ``--model.variant.num_iterations=2``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ..configs import ConfigError, from_dict
from .moe import MoE, MoEConfig

__all__ = ["register_ffn", "build_ffn", "FFN_BUILDERS"]

FFNBuilder = Callable[..., nn.Module]
FFN_BUILDERS: dict[str, FFNBuilder] = {}


def register_ffn(name: str):
    """Decorator registering a feed-forward builder under ``name``."""

    def wrap(fn: FFNBuilder) -> FFNBuilder:
        FFN_BUILDERS[name] = fn
        return fn

    return wrap


def build_ffn(kind: str, moe: MoEConfig, options: dict | None = None, *, layer_index: int = 0,
              num_layers: int = 1, name: str = "moe") -> nn.Module:
    """Build the feed-forward module ``kind`` for one block."""
    if kind not in FFN_BUILDERS:
        close = difflib.get_close_matches(kind, list(FFN_BUILDERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown feed-forward kind {kind!r}{hint}; available: {sorted(FFN_BUILDERS)}")
    return FFN_BUILDERS[kind](moe, dict(options or {}), layer_index=layer_index, num_layers=num_layers,
                              name=name)


@register_ffn("moe")
def _build_moe(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    if options:
        moe = from_dict(MoEConfig, {**_as_dict(moe), **options}, prefix="variant")
    return MoE(moe, name=name)


def _as_dict(cfg) -> dict:
    from ..configs import to_dict
    return to_dict(cfg)
