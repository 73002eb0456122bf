"""SEMA, self-expansion with a mixture of adapters for continual learning (code huiyiwang01/SEMA-CL @5a45512;
spec §23).

Dim legend: T tokens, I input features, O output features, N adapters so far, H bottleneck, Z descriptor latent.

In parallel with a frozen projection, a list of modular adapters, each a *functional adapter* (AdaptMLP
bottleneck ``up(relu(down(x)))``, ``up`` zero-initialised) paired with a *representation descriptor* (RD): an
autoencoder of the layer's input with the mean and std of its reconstruction losses on the task it was fitted
on. A router (one row per adapter) mixes them: ``y = W x + sum_n softmax(R x)_n adapter_n(x)``.

Per new task: :meth:`SEMA.detect` scores the task's inputs against every RD (per-token z-scores of the
reconstruction loss, mean |z| per RD) and flags a shift when the best RD's score exceeds ``threshold`` (2);
:meth:`SEMA.expand` then freezes everything so far and adds one adapter, one router row and one RD; after
training, :meth:`SEMA.fit_descriptor` trains the new RD and records its statistics. Old modules never change,
so knowledge is reused when no shift is detected. Choices made: the router scores each token (the paper
mean-pools the tokens of an image; a wrapped linear sees flattened tokens), dropout is left out, and
``expandable=False`` keeps a single adapter (the paper's non-expandable blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check
from ..types import RoutingContext
from .core import LinearAdapter

__all__ = ["SEMA", "SEMAConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SEMAConfig:
    """Attributes: bottleneck H (16), descriptor_dim Z (128, capped at the input size), threshold (2.0),
    expandable (True)."""

    bottleneck: int = 16
    descriptor_dim: int = 128
    threshold: float = 2.0
    expandable: bool = True

    def __post_init__(self) -> None:
        for name in ("bottleneck", "descriptor_dim"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"sema.{name}={value!r} must be a positive integer")
        check(self.threshold > 0, f"sema.threshold={self.threshold} must be positive (2.0 in SEMA)")


class _Descriptor(nn.Module):
    """Autoencoder of the layer input with the statistics of its reconstruction loss."""

    loss_mean: torch.Tensor
    loss_std: torch.Tensor

    def __init__(self, dim: int, latent: int) -> None:
        super().__init__()
        self.encode, self.decode = nn.Linear(dim, latent), nn.Linear(latent, dim)
        self.register_buffer("loss_mean", torch.zeros(()))
        self.register_buffer("loss_std", torch.zeros(()))

    def losses(self, x_TI: torch.Tensor) -> torch.Tensor:
        return (self.decode(torch.relu(self.encode(x_TI))) - x_TI).square().mean(-1)


class SEMA(LinearAdapter):
    """A growing mixture of bottleneck adapters with representation descriptors."""

    def __init__(self, in_features: int, out_features: int, config: SEMAConfig) -> None:
        super().__init__()
        self.config, self.in_features, self.out_features = config, in_features, out_features
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        self.router = nn.ParameterList()
        self.descriptors = nn.ModuleList()
        self._add()

    @property
    def num_adapters(self) -> int:
        return len(self.down)

    def _add(self) -> None:
        H, I = self.config.bottleneck, self.in_features
        self.down.append(nn.Parameter(torch.randn(H, I) * I**-0.5))
        self.up.append(nn.Parameter(torch.zeros(self.out_features, H)))
        self.router.append(nn.Parameter(torch.randn(1, I) * 0.01))
        self.descriptors.append(_Descriptor(I, min(self.config.descriptor_dim, I)).requires_grad_(False))

    def expand(self) -> None:
        """Freeze every adapter, router row and descriptor so far; add a new trainable adapter and router row."""
        if not self.config.expandable:
            raise ValueError("this SEMA layer is not expandable (sema.expandable=False); it keeps one adapter")
        device = self.down[0].device
        for p in self.parameters():
            p.requires_grad_(False)
        self._add()
        for p in (self.down[-1], self.up[-1], self.router[-1]):
            p.data = p.data.to(device)
        self.descriptors[-1].to(device)

    def rds(self) -> list[_Descriptor]:
        """The representation descriptors, oldest first."""
        return [rd for rd in self.descriptors if isinstance(rd, _Descriptor)]

    def structure(self) -> dict[str, Any]:
        return {"adapters": self.num_adapters}

    def restructure(self, structure: dict[str, Any]) -> None:
        while self.num_adapters < int(structure.get("adapters", 1)):
            self._add()

    @torch.no_grad()
    def shift_scores(self, x_TI: torch.Tensor) -> torch.Tensor:
        """Mean |z| of every fitted descriptor's reconstruction losses on ``x`` (``inf`` for unfitted ones)."""
        scores = []
        for rd in self.rds():
            if rd.loss_std <= 0:
                scores.append(torch.tensor(float("inf")))
                continue
            z_T = (rd.losses(x_TI.float()) - rd.loss_mean) / rd.loss_std
            scores.append(z_T.abs().mean())
        return torch.stack(scores)

    def detect(self, x_TI: torch.Tensor) -> bool:
        """A distribution shift: no descriptor explains ``x`` (``min_n mean|z_n| > threshold``)."""
        return bool(self.shift_scores(x_TI).min() > self.config.threshold)

    def fit_descriptor(self, x_TI: torch.Tensor, steps: int = 200, lr: float = 1e-2) -> None:
        """Train the newest descriptor on ``x`` (the task's layer inputs), record its loss statistics, freeze it."""
        rd = self.rds()[-1]
        rd.requires_grad_(True)
        opt = torch.optim.Adam(rd.parameters(), lr=lr)
        x_TI = x_TI.detach().float()
        for _ in range(steps):
            loss = rd.losses(x_TI).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        rd.requires_grad_(False)
        with torch.no_grad():
            losses_T = rd.losses(x_TI)
            rd.loss_mean.copy_(losses_T.mean())
            rd.loss_std.copy_(losses_T.std().clamp_min(1e-8))

    def mixing(self, x_TI: torch.Tensor) -> torch.Tensor:
        """Router weights ``[T, N]`` (softmax over the adapters)."""
        return F.linear(x_TI, torch.cat(list(self.router))).softmax(-1)

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "sema") -> torch.Tensor:
        x_TI = x_TI.to(self.down[0].dtype)
        w_TN = self.mixing(x_TI)
        y_TO = x_TI.new_zeros(x_TI.shape[0], self.out_features)
        for n in range(self.num_adapters):
            y_TO = y_TO + w_TN[:, n:n + 1] * F.linear(torch.relu(F.linear(x_TI, self.down[n])), self.up[n])
        return y_TO
