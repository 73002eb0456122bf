"""Dr.LLM: per-layer routers that skip, execute or repeat each block (Heakl et al. 2025, github
parameterlab/dr-llm, models/modeling_llama.py; architectures.md §21).

Dim legend: B batch, S sequence, D model dim, L layers, W windows, O = 3 decisions, P paths.

Router of layer ``i`` (a bottleneck MLP ``D -> hidden -> 3``, GELU-tanh) reads the hidden states entering the
block for the whole sequence, split into ``num_windows`` contiguous windows (one per token when the sequence is
shorter), mean-pooled per window; the window logits are averaged: one decision per layer and sequence, the number
of times the block is applied (0 skip, 1 execute, 2 repeat with the same weights)::

    h_{i+1} = h_i | block_i(h_i) | block_i(block_i(h_i))

Supervision: the routers learn, with a class-balanced focal loss ``-alpha_c (1 - p_c)^gamma log p_c``, the paths
found by a search over layer paths. The paper's length-aware MCTS is replaced by its budgeted substitute here:
an exhaustive search over the ``3^L`` paths (refused beyond ``max_paths``), keeping per sequence the path with the
fewest block applications among those whose loss is at most the all-execute path's loss plus ``tolerance``
(ties: the lowest loss) — accuracy-preserving paths, preferring short ones, as MCTS keeps them.

Training (the training-step hook :meth:`LayerPathRouters.training_step`): the forward runs the all-execute path;
the search labels every sequence of the micro-batch (no gradient); a second forward follows the label path and
collects each router's logits on detached inputs, so the focal loss trains the routers only. ``stage = "routers"``
freezes the base model (the paper: only the CE is reported, not back-propagated); ``stage = "joint"`` also trains
the base with its CE on the all-execute path (moekit's addition so that one ``moekit train`` run gives both). At
evaluation each router's argmax decides. Blocks run on the whole batch and the decision selects per sequence
(the result of per-sequence execution; not its compute saving). gamma = 2 (the spec leaves it to check).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...types import Routing, RoutingContext
from ..step_hook import Forward, StepLoss, language_model_loss
from ._common import record_stats

__all__ = ["LOGITS_KEY", "PATH_KEY", "DrLLMConfig", "LayerPathRouters", "focal_loss", "search_paths", "window_pool"]

PATH_KEY = "drllm.path"  # ctx.state: [B, L] forced decisions
LOGITS_KEY = "drllm.logits"  # ctx.state: list of [B, 3] router logits, one per layer
P = "model.depth_routing"


@dataclass(frozen=True, kw_only=True, slots=True)
class DrLLMConfig:
    """Attributes:
        hidden: router bottleneck (the code: 128).
        num_windows: contiguous windows pooled per sequence (the code: 8).
        focal_gamma: gamma of the focal loss.
        router_coef: weight of the focal loss.
        stage: ``routers`` (frozen base, the paper) or ``joint`` (the base trains too, on the all-execute path).
        tolerance: loss increase over the all-execute path a searched path may have.
        max_paths: largest exhaustive search (``3^L``).
    """

    hidden: int = 128
    num_windows: int = 8
    focal_gamma: float = 2.0
    router_coef: float = 1.0
    stage: Literal["routers", "joint"] = "joint"
    tolerance: float = 0.0
    max_paths: int = 729

    def __post_init__(self) -> None:
        for name in ("hidden", "num_windows", "max_paths"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{P}.{name}={value!r} must be a positive integer")
        check(self.focal_gamma >= 0, f"{P}.focal_gamma={self.focal_gamma} must be >= 0")
        check(self.router_coef > 0, f"{P}.router_coef={self.router_coef} must be > 0")
        check_choice(P, "stage", self.stage, ("routers", "joint"))
        check(self.tolerance >= 0, f"{P}.tolerance={self.tolerance} must be >= 0")


def window_pool(h_BSD: torch.Tensor, num_windows: int) -> torch.Tensor:
    """``[B, W, D]`` means of ``W = min(num_windows, S)`` contiguous windows (one per token when S is shorter)."""
    S = h_BSD.shape[1]
    return torch.stack([chunk.mean(1) for chunk in h_BSD.tensor_split(min(num_windows, S), dim=1)], dim=1)


def focal_loss(logits_NO: torch.Tensor, labels_N: torch.Tensor, gamma: float) -> torch.Tensor:
    """Class-balanced focal loss, mean over ``N``: ``alpha_c`` is the inverse frequency of class ``c`` among the
    labels, normalised so that the weights average 1 over the labels."""
    logp = logits_NO.float().log_softmax(-1).gather(1, labels_N[:, None]).squeeze(1)
    counts = torch.bincount(labels_N, minlength=logits_NO.shape[1]).float()
    alpha = (1.0 / counts.clamp_min(1))[labels_N]
    alpha = alpha / alpha.mean()
    return -(alpha * (1 - logp.exp()) ** gamma * logp).mean()


def search_paths(run: Callable[[torch.Tensor], torch.Tensor], num_sequences: int, num_layers: int,
                 tolerance: float = 0.0, max_paths: int = 729) -> torch.Tensor:
    """``[B, L]`` searched decisions: per sequence, the fewest block applications within ``tolerance`` of the
    all-execute loss (ties: lowest loss).

    Args:
        run: ``run(path_BL) -> loss_B``, each sequence's loss when the blocks follow ``path_BL``.
    """
    paths = list(itertools.product((0, 1, 2), repeat=num_layers))
    check(len(paths) <= max_paths, f"{len(paths)} layer paths exceed {P}.max_paths={max_paths}; raise max_paths "
                                   f"or use fewer layers")
    paths_PL = torch.tensor(paths)
    losses_PB = torch.stack([run(p.expand(num_sequences, num_layers)) for p in paths_PL])
    base_B = losses_PB[paths.index((1,) * num_layers)]
    ok_PB = losses_PB <= base_B + tolerance
    length_P = paths_PL.sum(1).to(losses_PB.dtype)
    # fewest applications first, then lowest loss: rank by length * big + loss among acceptable paths
    spread = (losses_PB.max() - losses_PB.min()).abs() + 1.0
    key_PB = torch.where(ok_PB, length_P[:, None] * spread * 2 + losses_PB, torch.tensor(float("inf")))
    return paths_PL[key_PB.argmin(0)]


class LayerRouter(nn.Module):
    """``D -> hidden -> 3`` with GELU-tanh; window logits averaged to one ``[B, 3]`` decision per sequence."""

    def __init__(self, dim: int, hidden: int, num_windows: int) -> None:
        super().__init__()
        self.num_windows = num_windows
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, 3)

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        pooled_BWD = window_pool(h_BSD.float(), self.num_windows)
        return self.down(F.gelu(self.up(pooled_BWD.to(self.up.weight.dtype)), approximate="tanh")).mean(1)


class LayerPathRouters(nn.Module):
    """The per-layer routers of a model; ``forward(x_BSD, blocks, ctx)`` runs the blocks along the decided path.

    Args:
        dim, num_layers: the model's sizes.
        config: a :class:`DrLLMConfig`.
    """

    def __init__(self, dim: int, num_layers: int, config: DrLLMConfig | None = None, name: str = "drllm") -> None:
        super().__init__()
        self.config, self.name, self.num_layers = config or DrLLMConfig(), name, num_layers
        self.routers = nn.ModuleList(LayerRouter(dim, self.config.hidden, self.config.num_windows)
                                     for _ in range(num_layers))

    def forward(self, x_BSD: torch.Tensor, blocks: list[Callable[[torch.Tensor, RoutingContext], torch.Tensor]],
                ctx: RoutingContext) -> torch.Tensor:
        forced = ctx.state.get(PATH_KEY)
        logits, decisions = [], []
        for i, block in enumerate(blocks):
            logits_B3 = self.routers[i](x_BSD.detach())
            logits.append(logits_B3)
            if forced is not None:
                d_B = forced[:, i].to(x_BSD.device)
            elif self.training:
                d_B = torch.ones(x_BSD.shape[0], dtype=torch.long, device=x_BSD.device)
            else:
                d_B = logits_B3.argmax(-1)
            decisions.append(d_B)
            d_B11 = d_B[:, None, None]
            once = block(x_BSD, ctx)
            twice = block(once, ctx) if bool((d_B == 2).any()) else once
            x_BSD = torch.where(d_B11 == 0, x_BSD, torch.where(d_B11 == 1, once, twice))
        ctx.state[LOGITS_KEY] = logits
        if ctx.collect_stats:
            d_BL = torch.stack(decisions, 1)
            scores = torch.cat(logits).detach().float().softmax(-1)
            routing = Routing(expert_ids_TK=d_BL.reshape(-1, 1), weights_TK=torch.ones(d_BL.numel(), 1),
                              scores_TE=scores, logits_TE=scores.log())
            record_stats(ctx, self.name, routing, layers_executed=d_BL.sum(1).float().mean(),
                         layers_skipped=(d_BL == 0).sum(1).float().mean())
        return x_BSD

    @staticmethod
    def training_step(modules: list[LayerPathRouters], forward: Forward, targets_BS: torch.Tensor,
                      collect_stats: bool) -> StepLoss:
        """All-execute CE (back-propagated only in the joint stage) + the focal loss on searched paths."""
        self = modules[0]
        c = self.config
        plain = language_model_loss(forward, targets_BS, collect_stats)
        B = targets_BS.shape[0]

        def run(path_BL: torch.Tensor) -> torch.Tensor:
            ctx = RoutingContext()
            ctx.state[PATH_KEY] = path_BL
            logits_BSV, _ = forward(ctx)
            return F.cross_entropy(logits_BSV.float().transpose(1, 2), targets_BS, reduction="none").mean(1)

        with torch.no_grad():
            labels_BL = search_paths(run, B, self.num_layers, c.tolerance, c.max_paths).to(targets_BS.device)
        teacher = RoutingContext()
        teacher.state[PATH_KEY] = labels_BL
        forward(teacher)
        logits_BL3 = torch.stack(teacher.state[LOGITS_KEY], dim=1)
        router_loss = c.router_coef * focal_loss(logits_BL3.reshape(-1, 3), labels_BL.reshape(-1), c.focal_gamma)
        plain.ctx.add_loss("drllm_router_loss", router_loss)
        if collect_stats:
            plain.ctx.stats[self.name].extra["searched_layers_executed"] = labels_BL.sum(1).float().mean()
        base = plain.loss if c.stage == "joint" else plain.loss.detach()
        return StepLoss(loss=base + router_loss, ce=plain.ce, aux=plain.aux + router_loss, ctx=plain.ctx,
                        logits_BSV=plain.logits_BSV)
