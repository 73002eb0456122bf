"""The MoE layer: Router -> Routing -> Engine(x, Routing, ExpertBank) (+ shared experts).

Dim legend: T tokens, D model dim, F expert hidden dim, E experts, K slots per token.

A drop-in replacement for a feed-forward module (``[..., D] -> [..., D]``). Its definition::

    y_t = sum_k weights_tk * w_down[e] @ (act(w_gate[e] @ x_t) * (w_up[e] @ x_t)),  e = expert_ids_tk
          (+ shared_experts(x_t))

Shared experts (DeepSeekMoE, arXiv 2401.06066) are one dense FFN of ``num_shared_experts * hidden_dim``
(or ``shared_hidden_dim``) units that every token uses. Qwen2-MoE scales their output per token by a learned
sigmoid gate, ``sigmoid(w_shared_gate @ x_t)`` (``use_shared_gate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check, check_choice, check_types
from ..dispatch import ENGINES, resolve_engine
from ..experts import ACTIVATIONS, ExpertBank, FeedForward
from ..routing import Router, RouterConfig
from ..types import LayerStats, Routing, RoutingContext

__all__ = ["MoEConfig", "MoE", "routing_stats", "check_input"]

# "alltoall" is set by moekit.parallel.shard_experts on expert-parallel layers (auto never picks it).
EngineName = Literal["auto", "reference", "sorted", "sorted_blocked", "sorted_op", "grouped_mm", "alltoall"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoEConfig:
    """A Mixture-of-Experts feed-forward layer.

    Attributes:
        dim: model dimension D.
        hidden_dim: hidden dimension F of each routed expert.
        num_experts: routed experts E.
        top_k: experts per token K (for expert choice: average experts per token, which sets capacity).
        activation: ``swiglu`` / ``clamped_swiglu`` (gated), ``gelu`` or ``relu``.
        num_shared_experts: shared experts every token uses (one dense FFN of that many times hidden_dim).
        shared_hidden_dim: hidden size of that shared FFN when it is not ``num_shared_experts * hidden_dim``
            (Qwen2-MoE); ``None`` keeps the product.
        use_shared_gate: scale the shared experts' output by ``sigmoid(w_shared_gate @ x)`` (Qwen2-MoE).
        use_ffn_bias: the routed experts' projections carry per-expert biases (GPT-OSS, split BERT FFNs).
        engine: ``auto`` picks the fastest engine that supports the device and dtype (under ``torch.compile``,
            the compile-friendly ``sorted_op``); or ``reference``, ``sorted``, ``sorted_blocked`` (``sorted``
            block by block, saving a third less for backward), ``sorted_op``, ``grouped_mm``.
        router: scorer, selector and balancing settings.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2
    activation: Literal["swiglu", "clamped_swiglu", "gelu", "relu"] = "swiglu"
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    use_shared_gate: bool = False
    use_ffn_bias: bool = False
    engine: str = "auto"  # EngineName or an engine registered later (e.g. serving's "offload")
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        check_types(self, "moe")
        for name in ("dim", "hidden_dim", "num_experts", "top_k"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"moe.{name}={value!r} must be a positive integer")
        check(self.top_k <= self.num_experts,
              f"top_k={self.top_k} exceeds num_experts={self.num_experts}; lower top_k or raise num_experts")
        check(self.num_shared_experts >= 0,
              f"moe.num_shared_experts={self.num_shared_experts} must be >= 0 (0 means none)")
        check(self.shared_hidden_dim is None or (self.num_shared_experts > 0 and self.shared_hidden_dim >= 1),
              f"moe.shared_hidden_dim={self.shared_hidden_dim} needs num_shared_experts >= 1 and a positive "
              f"size; set num_shared_experts=1 or leave shared_hidden_dim=None")
        check(not self.use_shared_gate or self.num_shared_experts > 0,
              "moe.use_shared_gate=True needs num_shared_experts >= 1 (there is nothing to gate)")
        check_choice("moe", "activation", self.activation, ACTIVATIONS)
        check_choice("moe", "engine", self.engine, ("auto", *sorted(ENGINES)))
        check(isinstance(self.router, RouterConfig), f"moe.router must be a RouterConfig, got {self.router!r}")
        self.router.validate_for(self.num_experts, self.top_k)

    @property
    def shared_size(self) -> int:
        """Hidden units of the shared FFN (0 without shared experts)."""
        if self.shared_hidden_dim is not None:
            return self.shared_hidden_dim
        return self.num_shared_experts * self.hidden_dim

    @property
    def active_hidden(self) -> int:
        """Hidden units each token uses: ``top_k * hidden_dim`` plus the shared FFN's."""
        return self.top_k * self.hidden_dim + self.shared_size


def check_input(x: torch.Tensor, weight: torch.Tensor, layer: str) -> None:
    """Dtype and device guard: the experts never silently compute in another dtype than their weights.

    A bfloat16 / float16 input to a float32 layer (or any other mismatch) raises a ``ValueError`` saying how to
    fix it, unless ``torch.autocast`` is active for the input's device (autocast then picks the matmul dtype).
    The router itself always runs in float32 and accepts any floating input.
    """
    if x.device != weight.device:
        raise ValueError(f"{layer}: input is on {x.device} but the layer's weights are on {weight.device}; "
                         f"move one of them (e.g. layer.to({str(x.device)!r}))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{layer}: input dtype {x.dtype} does not match the layer's weights ({weight.dtype}); "
                         f"cast the input (x.to({weight.dtype})), cast the layer (layer.to({x.dtype})), "
                         f"or run under torch.autocast")


def routing_stats(routing: Routing, bias_E: torch.Tensor | None = None) -> LayerStats:
    """Per-layer statistics of one routing decision (device tensors; no host sync here)."""
    E = routing.num_experts
    scores_TE = routing.scores_TE.detach()
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    entropy = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()
    ids_TK = routing.expert_ids_TK
    return LayerStats(
        counts_E=routing.counts_E(E),
        num_slots=ids_TK.numel(),
        num_dropped=(ids_TK < 0).sum() if routing.num_dropped is None else routing.num_dropped.detach(),
        token_entropy=entropy / math.log(E) if E > 1 else entropy,
        bias_E=None if bias_E is None else bias_E.detach().clone(),
    )


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward layer; ``forward(x, ctx=None)`` maps ``[..., D] -> [..., D]``.

    Args:
        config: the layer's :class:`MoEConfig`.
        name: the layer's name in a :class:`RoutingContext` (losses and statistics are recorded under it).
    """

    w_shared_gate: nn.Parameter | None

    def __init__(self, config: MoEConfig, name: str = "moe") -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.router = Router(config.dim, config.num_experts, config.top_k, config.router)
        self.experts = ExpertBank(config.num_experts, config.dim, config.hidden_dim, config.activation,
                                  use_bias=config.use_ffn_bias)
        self.shared_experts = (
            FeedForward(config.dim, config.shared_size, config.activation)
            if config.num_shared_experts > 0 else None)
        self.register_parameter(
            "w_shared_gate",
            nn.Parameter(torch.zeros(1, config.dim)) if config.use_shared_gate else None)

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"MoE expects inputs of shape [..., {self.config.dim}], got {tuple(x.shape)}; "
                             f"check MoEConfig.dim")
        return x.reshape(-1, self.config.dim)

    def route(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None, num_sequences: int = 1) -> Routing:
        """The routing decision alone (losses go to ``ctx`` when given)."""
        return self.router(self._flatten(x_TD), ctx, layer=self.name, num_sequences=num_sequences)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD = self._flatten(x)
        num_sequences = x.shape[0] if x.dim() == 3 else 1
        routing = self.route(x_TD, ctx, num_sequences)
        y_TD = self.combine(x_TD, routing, ctx)
        return y_TD.view(x.shape)

    def combine(self, x_TD: torch.Tensor, routing: Routing, ctx: RoutingContext | None = None) -> torch.Tensor:
        """Run the experts for a given routing (plus shared experts) and record statistics."""
        weight = getattr(self.experts, "w_up", None)  # banks stored otherwise (compressed) check their own input
        if isinstance(weight, torch.Tensor):
            check_input(x_TD, weight, self.name)
        engine = resolve_engine(self.config.engine, x_TD, self.experts)
        y_TD = engine(x_TD, routing, self.experts)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.w_shared_gate is not None:
                shared_TD = torch.sigmoid(F.linear(x_TD, self.w_shared_gate)) * shared_TD
            y_TD = y_TD + shared_TD
        if ctx is not None and ctx.collect_stats:
            bias = self.router.expert_bias if self.router.uses_bias else None
            ctx.add_stats(self.name, routing_stats(routing, bias))
        return y_TD

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, hidden_dim={c.hidden_dim}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"shared={c.num_shared_experts}, engine={c.engine}")
