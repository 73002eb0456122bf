"""Mixture-of-Supernets: architecture-routed MoE weights for weight-sharing NAS (compression-adaptation-
serving.md §31; details "known", not re-read), on moekit's language model.

Dim legend: T tokens, D model dim, F the largest FFN width, M weight experts, L layers.

A sub-architecture ``a`` gives every layer an FFN width (a fraction of ``moe.hidden_dim``). Each supernet layer
holds ``M`` full-width SwiGLU weight sets and a small router on the architecture encoding ``enc(a)`` (the width
fractions of all ``L`` layers)::

    alpha(a) = softmax(Router(enc(a)))                          layer-wise: [M];  neuron-wise: [M, F]
    W(a)     = slice_a( sum_i alpha_i(a) W_i )                  the first width(a) hidden units
    y        = W_down(a) (silu(W_gate(a) x) * W_up(a) x)

Training (the training-step hook :meth:`SupernetFFN.training_step`): per micro-batch the sandwich rule trains the
largest, the smallest and one random sub-architecture (``sampling = "sandwich"``), or one random one
(``random``); each sub-architecture's loss is added. The architecture reaches the layers through
``ctx.state["supernet.arch"]`` (a tuple of width fractions, one per layer); without one, a layer runs at
``eval_width``. Choices: neuron-wise mixtures are per hidden unit (shared by the three matrices of that unit);
the router is ``L -> router_hidden -> M (x F)`` with GELU; HAT's other searchable dimensions (heads, depth, model
width) are not searched here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...types import RoutingContext
from ..moe import MoEConfig
from ..registry import register_ffn
from ..step_hook import Forward, StepLoss, language_model_loss
from ._common import add_extra, flatten, parse_options

__all__ = ["ARCH_KEY", "SupernetConfig", "SupernetFFN"]

ARCH_KEY = "supernet.arch"


@dataclass(frozen=True, kw_only=True, slots=True)
class SupernetConfig:
    """Attributes:
        num_weight_experts: M weight sets mixed by the router (1: the standard weight-sharing supernet).
        widths: candidate FFN widths, as fractions of ``moe.hidden_dim`` (the search space per layer).
        granularity: ``layer`` (one mixture per layer) or ``neuron`` (one per hidden unit).
        router_hidden: the router MLP's hidden width.
        sampling: ``sandwich`` (largest + smallest + one random per step) or ``random`` (one random).
        eval_width: width fraction of every layer when no architecture is given (evaluation).
    """

    num_weight_experts: int = 2
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    granularity: Literal["layer", "neuron"] = "layer"
    router_hidden: int = 16
    sampling: Literal["sandwich", "random"] = "sandwich"
    eval_width: float = 1.0

    def __post_init__(self) -> None:
        check(isinstance(self.num_weight_experts, int) and self.num_weight_experts >= 1,
              f"variant.num_weight_experts={self.num_weight_experts!r} must be a positive integer")
        check(len(self.widths) >= 1 and all(0 < w <= 1 for w in self.widths),
              f"variant.widths={self.widths!r} must be fractions in (0, 1] of moe.hidden_dim")
        check_choice("variant", "granularity", self.granularity, ("layer", "neuron"))
        check_choice("variant", "sampling", self.sampling, ("sandwich", "random"))
        check(0 < self.eval_width <= 1, f"variant.eval_width={self.eval_width} must be in (0, 1]")
        check(isinstance(self.router_hidden, int) and self.router_hidden >= 1,
              f"variant.router_hidden={self.router_hidden!r} must be a positive integer")


class SupernetFFN(nn.Module):
    """A supernet FFN layer: ``forward(x, ctx=None)`` at the width ``ctx.state["supernet.arch"]`` gives it."""

    def __init__(self, moe: MoEConfig, config: SupernetConfig | None = None, *, layer_index: int = 0,
                 num_layers: int = 1, name: str = "supernet") -> None:
        super().__init__()
        check(moe.activation == "swiglu", f"the supernet FFN is SwiGLU; set moe.activation='swiglu' "
                                          f"(got {moe.activation!r})")
        self.moe_config, self.config, self.name = moe, config or SupernetConfig(), name
        self.layer_index, self.num_layers = layer_index, num_layers
        M, Fmax, D = self.config.num_weight_experts, moe.hidden_dim, moe.dim
        self.w_gate_MFD = nn.Parameter(torch.randn(M, Fmax, D) * D**-0.5)
        self.w_up_MFD = nn.Parameter(torch.randn(M, Fmax, D) * D**-0.5)
        self.w_down_MDF = nn.Parameter(torch.randn(M, D, Fmax) * Fmax**-0.5)
        out = M * Fmax if self.config.granularity == "neuron" else M
        self.router = nn.Sequential(nn.Linear(num_layers, self.config.router_hidden), nn.GELU(),
                                    nn.Linear(self.config.router_hidden, out))

    def width(self, fraction: float) -> int:
        return max(1, round(fraction * self.moe_config.hidden_dim))

    def mixture(self, arch: tuple[float, ...]) -> torch.Tensor:
        """``alpha(a)``: ``[M, 1]`` (layer-wise) or ``[M, F]`` (neuron-wise), summing to 1 over ``M``."""
        check(len(arch) == self.num_layers, f"a supernet architecture gives one width per layer: got {len(arch)} "
                                            f"values for {self.num_layers} layers")
        enc = torch.tensor(arch, dtype=self.w_up_MFD.dtype, device=self.w_up_MFD.device)
        logits = self.router(enc).view(self.config.num_weight_experts, -1)
        return logits.softmax(0)

    def weights(self, arch: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``W(a)``: ``(w_gate [f, D], w_up [f, D], w_down [D, f])`` for this layer's width ``f`` in ``a``."""
        f = self.width(arch[self.layer_index])
        alpha_MF = self.mixture(arch)
        gate = (alpha_MF[..., None] * self.w_gate_MFD).sum(0)[:f]
        up = (alpha_MF[..., None] * self.w_up_MFD).sum(0)[:f]
        down = (alpha_MF[:, None, :] * self.w_down_MDF).sum(0)[:, :f]
        return gate, up, down

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD, _ = flatten(x, self.moe_config.dim)
        arch = ctx.state.get(ARCH_KEY) if ctx is not None else None
        if arch is None:
            arch = (self.config.eval_width,) * self.num_layers
        gate, up, down = self.weights(tuple(arch))
        y_TD = F.linear(F.silu(F.linear(x_TD, gate)) * F.linear(x_TD, up), down)
        alpha = self.mixture(tuple(arch)).detach()
        add_extra(ctx, self.name, width=float(self.width(arch[self.layer_index])),
                  alpha_max=alpha.max(0).values.mean())
        return y_TD.view(x.shape)

    @staticmethod
    def training_step(modules: list[SupernetFFN], forward: Forward, targets_BS: torch.Tensor,
                      collect_stats: bool) -> StepLoss:
        """Sandwich (or random) sampling of sub-architectures; their losses are summed."""
        c, L = modules[0].config, modules[0].num_layers
        widths = torch.tensor(c.widths)

        def random_arch() -> tuple[float, ...]:
            return tuple(float(w) for w in widths[torch.randint(len(widths), (L,))])

        if c.sampling == "sandwich":
            archs = [(max(c.widths),) * L, (min(c.widths),) * L, random_arch()]
        else:
            archs = [random_arch()]
        results = []
        for i, arch in enumerate(archs):
            ctx = RoutingContext(collect_stats=collect_stats and i == 0)
            ctx.state[ARCH_KEY] = arch
            def run(_unused: RoutingContext, ctx: RoutingContext = ctx) -> tuple[torch.Tensor, RoutingContext]:
                return forward(ctx)

            results.append(language_model_loss(run, targets_BS, False))
        first = results[0]
        return StepLoss(loss=sum((r.loss for r in results[1:]), first.loss),
                        ce=sum((r.ce for r in results[1:]), first.ce) / len(results),
                        aux=sum((r.aux for r in results[1:]), first.aux), ctx=first.ctx,
                        logits_BSV=first.logits_BSV)


@register_ffn("supernet")
def build_supernet(moe: MoEConfig, options: dict, *, layer_index: int, num_layers: int, name: str) -> nn.Module:
    return SupernetFFN(moe, parse_options(SupernetConfig, options), layer_index=layer_index, num_layers=num_layers,
                       name=name)
