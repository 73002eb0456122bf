"""Scaling MLPs (no spec; Bachmann, Anagnostidis & Hofmann, "Scaling MLPs: A Tale of Inductive Bias", 2023):
pure MLP vision models and how their accuracy scales, with dense vs MoE blocks at equal active compute.

The paper (read from its abstract): MLPs of pre-norm inverted-bottleneck blocks (``x + W_2 σ(W_1 LN(x))``,
expansion 4), trained with heavy data augmentation, improve steadily with width, depth and data, much as
models with stronger inductive bias do. Here, on scikit-learn's bundled 8×8 digits (flattened, 64 inputs):

- augmentation: a random shift of up to ``max_shift`` pixels (zero-filled) and Gaussian pixel noise;
- blocks: dense (hidden ``4·width``) or a moekit :class:`~moekit.layers.moe.MoE` with ``num_experts`` GELU
  experts of the same hidden size and ``top_k = 1`` (the same active compute per token as the dense block,
  ``num_experts`` times its parameters), with the Switch balancing loss from its :class:`RoutingContext`;
- sweeps: width at full data, and the training-data fraction at the middle width; ``seeds`` seeds each.

Dims: B images, D width, F = 4·D hidden, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.moe import MoE, MoEConfig
from ..routing import RouterConfig
from ..types import RoutingContext
from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["MLPNet", "ScalingMLPsConfig", "augment", "run"]


@dataclass(frozen=True, kw_only=True)
class ScalingMLPsConfig:
    """Scaling MLPs application settings."""

    seeds: int = 3
    widths: tuple[int, ...] = (16, 32, 64)
    data_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    depth: int = 2
    num_experts: int = 4
    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 1
    noise: float = 0.1

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "depth", "num_experts", "epochs", "batch_size"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(len(self.widths) > 0 and all(w >= 1 for w in self.widths), n, "widths", self.widths,
                    "one or more widths >= 1")
        check_field(len(self.data_fractions) > 0 and all(0 < f <= 1 for f in self.data_fractions), n,
                    "data_fractions", self.data_fractions, "one or more fractions in (0, 1]")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")
        check_field(0 <= self.max_shift <= 3, n, "max_shift", self.max_shift, "0..3 pixels")
        check_field(self.noise >= 0, n, "noise", self.noise, ">= 0")


def augment(x_B1HW: torch.Tensor, max_shift: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each axis (zero fill) and add N(0, noise²) noise."""
    b = x_B1HW.shape[0]
    if max_shift > 0:
        pad = F.pad(x_B1HW, (max_shift,) * 4)
        dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
        h, w = x_B1HW.shape[-2:]
        x_B1HW = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if noise > 0:
        x_B1HW = x_B1HW + noise * torch.randn(x_B1HW.shape, generator=gen)
    return x_B1HW


class _DenseFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_TD)))


class MLPNet(nn.Module):
    """Embed → ``depth`` pre-norm residual blocks (dense or MoE FFN) → LayerNorm → linear head."""

    def __init__(self, width: int, depth: int, kind: str, num_experts: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        moe_cfg = MoEConfig(dim=width, hidden_dim=4 * width, num_experts=num_experts, top_k=1, activation="gelu",
                            router=RouterConfig(aux_loss_coef=0.01))
        self.ffns = nn.ModuleList([MoE(moe_cfg, name=f"block{i}") if kind == "moe" else _DenseFFN(width)
                                   for i in range(depth)])
        self.out_norm, self.head = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, x_B1HW: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        h_BD = self.embed(x_B1HW.flatten(1))
        for norm, ffn in zip(self.norms, self.ffns, strict=True):
            h_BD = h_BD + ffn(norm(h_BD), ctx)
        return self.head(self.out_norm(h_BD))


def active_ffn_params(model: MLPNet) -> int:
    """Feed-forward weights one token uses (router excluded): equal for dense and top-1 MoE of one width."""
    total = 0
    for ffn in model.ffns:
        if isinstance(ffn, MoE):
            total += ffn.experts.w_up[0].numel() + ffn.experts.w_down[0].numel()
        else:
            total += sum(p.numel() for p in ffn.parameters())
    return total


def train_eval(width: int, kind: str, fraction: float, cfg: ScalingMLPsConfig, seed: int, data) -> float:
    x_tr, y_tr, x_te, y_te = data
    n = max(cfg.batch_size, int(fraction * len(y_tr)))
    x_tr, y_tr = x_tr[:n], y_tr[:n]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MLPNet(width, cfg.depth, kind, cfg.num_experts)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(y_tr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            ctx = RoutingContext()
            logits = model(augment(x_tr[idx], cfg.max_shift, cfg.noise, gen), ctx)
            loss = F.cross_entropy(logits, y_tr[idx]) + ctx.total_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_te).argmax(-1) == y_te).float().mean())


@register_app("scaling_mlps", config=ScalingMLPsConfig, requires=("sklearn",),
              summary="Scaling MLPs: inverted-bottleneck MLPs with augmentation on digits; accuracy vs width and "
                      "data, dense vs top-1 MoE blocks at equal active compute")
def run(config: ScalingMLPsConfig, out_dir: Path) -> dict:
    from .advmoe import load_digits
    rec = AppRun(out_dir, "scaling_mlps", config)
    mid = config.widths[len(config.widths) // 2]
    points = [("width", w, 1.0) for w in config.widths] + [("data", mid, f) for f in config.data_fractions
                                                          if f != 1.0]
    acc: dict[tuple[str, int, float], list[float]] = {}
    for seed in range(config.seeds):
        data = load_digits(seed)
        for _, w, f in points:
            for kind in ("dense", "moe"):
                a = train_eval(w, kind, f, config, seed, data)
                acc.setdefault((kind, w, f), []).append(a)
                rec.log({"seed": seed, "model": kind, "width": w, "data_fraction": f, "test_acc": a})
        rec.flush_metrics()
    table = [{"model": k, "width": w, "data_fraction": f, "median_test_acc": median(v), "test_acc": v}
             for (k, w, f), v in acc.items()]

    def draw(fig, ax):
        for i, kind in enumerate(("dense", "moe")):
            ax.plot(config.widths, [median(acc[(kind, w, 1.0)]) for w in config.widths], "o-", color=f"C{i}",
                    label=f"{kind} (full data)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width D (hidden 4·D; MoE: same active compute)")
        ax.set_ylabel("test accuracy (median over seeds)")
        ax.set_title("MLP accuracy vs width on digits")
        ax.legend()
        ax.grid(alpha=0.3)
    rec.plot("scaling", draw)
    moe_minus_dense = {f"width{w}_data{f}": median(acc[("moe", w, f)]) - median(acc[("dense", w, f)])
                       for _, w, f in points}
    return rec.finish({"app": "scaling_mlps", "seeds": config.seeds, "results": table,
                       "moe_minus_dense_median": moe_minus_dense})
