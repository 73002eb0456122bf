"""What every adapter method shares: the wrappers injected into a frozen model and the routing session.

Dim legend: T tokens, I input features, O output features, D model dim, F FFN hidden dim, E experts, K slots
per token, R LoRA rank.

An adapted ``nn.Linear`` computes ``y = base(x) + adapter(x)`` (:class:`AdaptedLinear`); an adapted gated
feed-forward hands its frozen weights to the adapter, which computes the whole output (:class:`AdaptedFFN`,
MixLoRA). The base module stays a child (``<name>.base``) and is never written to, except by ``merge()``.

Adapters that route record their losses and statistics in a :class:`~moekit.RoutingContext`, like a MoE layer.
A wrapped ``nn.Linear`` is called without one, so the :class:`Session` holds the context of the current forward:
a pre-hook on the adapted model takes the ``RoutingContext`` passed to it (moekit's language model), passes a
fresh one to a forward that accepts ``ctx`` but got none, or else creates one that ``Adapters.context`` exposes
(transformers models: add ``adapters.context.total_loss()`` to the loss).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..configs import ConfigError
from ..types import RoutingContext

__all__ = ["AdaptedFFN", "AdaptedLinear", "AdapterError", "FFNWeights", "LinearAdapter", "Session", "check_rank", "ffn_weights"]


class AdapterError(ConfigError):
    """Adapters that cannot be applied, loaded or merged as asked; the message says how to fix it."""


class Session:
    """Per-model state shared by every adapter layer: the routing context of the current forward, the task id."""

    def __init__(self, collect_stats: bool = False) -> None:
        self.collect_stats = collect_stats
        self.ctx: RoutingContext | None = None
        self.task: int | torch.Tensor = 0
        self.shared: dict[str, Any] = {}  # modules shared by several layers (MoS pools)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook (``with_kwargs=True``) on the adapted model: pick up or provide the context."""
        given = [a for a in (*args, *kwargs.values()) if isinstance(a, RoutingContext)]
        if given:
            self.ctx = given[0]
            return args, kwargs
        self.ctx = RoutingContext(collect_stats=self.collect_stats)
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
        except TypeError:
            return args, kwargs
        if "ctx" in inspect.signature(module.forward).parameters and bound.arguments.get("ctx") is None:
            bound.arguments["ctx"] = self.ctx
            return bound.args, bound.kwargs
        return args, kwargs


class LinearAdapter(nn.Module):
    """An update added to a frozen linear map: ``forward(x_TI, ctx, layer) -> dy_TO``."""

    in_features: int
    out_features: int

    def delta_weight(self) -> torch.Tensor | None:
        """``ΔW`` of shape ``[O, I]`` when the update is one input-independent matrix (mergeable), else None."""
        return None

    def structure(self) -> dict[str, Any]:
        """Shape facts beyond the config that a saved file must record (e.g. rank-1 experts added later)."""
        return {}

    def restructure(self, structure: dict[str, Any]) -> None:
        """Grow to a saved :meth:`structure` before its tensors are loaded."""


class AdaptedLinear(nn.Module):
    """``y = base(x) + adapter(x)``; ``base`` is the original, frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, adapter: LinearAdapter, name: str, session: Session) -> None:
        super().__init__()
        self.base, self.adapter, self.name = base, adapter, name
        self._session = session

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``linear.weight`` (tied heads, dtype checks) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        dy_TO = self.adapter(x.reshape(-1, x.shape[-1]), self._session.ctx, self.name)
        return y + dy_TO.view(y.shape).to(y.dtype)


class FFNWeights:
    """The frozen weights of a feed-forward, whatever its naming: ``w_gate`` (None if ungated), ``w_up``,
    ``w_down`` (``[F, D]``, ``[F, D]``, ``[D, F]``), their biases, and the activation ``act(gate, up)``."""

    def __init__(self, w_gate, w_up, w_down, act, b_gate=None, b_up=None, b_down=None) -> None:
        self.w_gate, self.w_up, self.w_down, self.act = w_gate, w_up, w_down, act
        self.b_gate, self.b_up, self.b_down = b_gate, b_up, b_down

    @property
    def dim(self) -> int:
        return self.w_up.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.w_up.shape[0]


def ffn_weights(module: nn.Module) -> FFNWeights | None:
    """The weights of moekit's :class:`~moekit.FeedForward` or of a LLaMA-style MLP (``gate_proj``, ``up_proj``,
    ``down_proj``, ``act_fn``); None for any other module."""
    from ..experts import FeedForward
    from ..experts.activations import hidden
    if isinstance(module, FeedForward):
        activation = module.activation
        return FFNWeights(module.w_gate, module.w_up, module.w_down, lambda g, u: hidden(activation, g, u))
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(p, nn.Linear) for p in parts) and callable(getattr(module, "act_fn", None)):
        gate, up, down = (p for p in parts if isinstance(p, nn.Linear))
        act_fn: Any = module.act_fn
        return FFNWeights(gate.weight, up.weight, down.weight, lambda g, u: act_fn(g) * u,
                          gate.bias, up.bias, down.bias)
    return None


class AdaptedFFN(nn.Module):
    """A feed-forward whose output the adapter computes from the frozen ``base``'s weights (MixLoRA)."""

    def __init__(self, base: nn.Module, adapter: nn.Module, name: str, session: Session) -> None:
        super().__init__()
        self.base, self.adapter, self.name = base, adapter, name
        self._session = session

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        weights = ffn_weights(self.base)
        assert weights is not None
        x_TD = x.reshape(-1, x.shape[-1])
        y_TD = self.adapter(x_TD, weights, ctx if ctx is not None else self._session.ctx, self.name)
        return y_TD.view(x.shape).to(x.dtype)


def check_rank(method: str, name: str, rank: int, *dims: int) -> None:
    """A rank larger than a dimension of the adapted map is an error naming the module and the limit."""
    limit = min(dims)
    if rank > limit:
        raise AdapterError(f"{method}.rank={rank} exceeds the smallest dimension ({limit}) of {name!r} "
                         f"(shape {'x'.join(map(str, dims))}); use rank <= {limit}")
