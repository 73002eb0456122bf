"""AdvMoE (spec §35; code OPTML-Group/Robust-MoE-CNN @c50796f) with the §36 robustness analysis, on digits.

Model (:class:`MoECNN`): every conv layer has ``num_experts`` channel groups of ``width_ratio × channels``
channels each; a separate small CNN router looks at the image and gives one top-1 expert per image per layer,
chosen by argmax with a straight-through estimator (exactly one-hot forward,
identity gradient to the softmax scores ``s``). Only the selected group's output channels are kept.
``num_experts=1, width_ratio=1`` is the dense CNN.

Training (:func:`trades_round`), per batch, alternating (TRADES):

(a) expert step: ``x_adv`` from 2 PGD steps maximising ``KL(f(x_adv)‖f(x)) + KL(r(x_adv)‖r(x))``; update only
    the backbone with ``CE(f(x), y) + β·KL(f(x_adv)‖f(x))/B``;
(b) router step: a fresh ``x_adv``; update only the router with ``α·CE(r(x), y mod E) + β·KL(r(x_adv)‖r(x))/B``
    (the released code's CE target; α = 6). ``r`` is the per-layer router distribution; its terms are summed
    over layers (a choice: the reference has one router head per layer and sums their losses).

Choices for this CPU-sized replica: scikit-learn's bundled 8×8 digits scaled to [0, 1], ε = 0.1 (8/255 is
below one grey level of these images), PGD step ε·5/8 (the spec's 5/255 : 8/255), SGD momentum 0.9 with a cosine
schedule over a few epochs instead of 100. With ``num_experts=1`` the router has no gradient and step (a) is
TRADES on the dense CNN.

Dims: B images, E experts, L conv layers, C channels, H = W = 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app
from .robustness import lipschitz_estimate, pgd_attack, pgd_ce, routing_flip_rate

__all__ = ["AdvMoEConfig", "MoECNN", "expert_step", "load_digits", "router_step", "run", "ste_top1", "trades_round"]


@dataclass(frozen=True, kw_only=True)
class AdvMoEConfig:
    """AdvMoE application settings; the MoE (E=2, width ratio 0.5) is compared with the dense CNN (E=1)."""

    seeds: int = 3
    epochs: int = 12
    batch_size: int = 64
    channels: int = 32
    num_experts: int = 2
    width_ratio: float = 0.5
    eps: float = 0.1
    train_pgd_steps: int = 2
    eval_pgd_steps: int = 10
    beta: float = 6.0
    alpha: float = 6.0
    lr: float = 0.1

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_field(self.seeds >= 1, n, "seeds", self.seeds, ">= 1")
        check_field(self.epochs >= 1, n, "epochs", self.epochs, ">= 1")
        check_field(self.batch_size >= 1, n, "batch_size", self.batch_size, ">= 1")
        check_field(self.num_experts >= 1, n, "num_experts", self.num_experts, ">= 1")
        check_field(0 < self.width_ratio <= 1, n, "width_ratio", self.width_ratio, "in (0, 1]")
        check_field(round(self.channels * self.width_ratio) >= 1, n, "channels", self.channels,
                    "channels * width_ratio >= 1", "raise channels or width_ratio")
        check_field(0 <= self.eps <= 1, n, "eps", self.eps, "in [0, 1] (pixels are in [0, 1])")
        for f in ("train_pgd_steps", "eval_pgd_steps"):
            check_field(getattr(self, f) >= 0, n, f, getattr(self, f), ">= 0")
        for f in ("beta", "alpha"):
            check_field(getattr(self, f) >= 0, n, f, getattr(self, f), ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")


class _StraightThroughTop1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores_BE: torch.Tensor) -> torch.Tensor:
        return F.one_hot(scores_BE.argmax(-1), scores_BE.shape[-1]).to(scores_BE.dtype)

    @staticmethod
    def backward(ctx, grad_BE: torch.Tensor) -> torch.Tensor:
        return grad_BE


def ste_top1(scores_BE: torch.Tensor) -> torch.Tensor:
    """Exactly one-hot of the argmax in the forward pass, identity gradient to ``scores_BE`` in the backward
    pass (an autograd function: ``onehot + s − s.detach()`` is off by rounding in the forward pass)."""
    return _StraightThroughTop1.apply(scores_BE)


class MoECNN(nn.Module):
    """Two 3×3 conv layers of ``num_experts`` channel groups, top-1 routed per image per layer, then a linear head.

    ``forward(x_B1HW, route)`` returns logits ``[B, 10]``; ``route`` is ``"top1"`` (the model), ``"runner_up"``
    (each layer's second-best expert: the §36 expert-substitution probe) or ``"all"`` (every group on).
    """

    def __init__(self, channels: int, num_experts: int, width_ratio: float, num_classes: int = 10) -> None:
        super().__init__()
        self.num_experts, self.group = num_experts, max(1, round(channels * width_ratio))
        width = self.num_experts * self.group
        self.convs = nn.ModuleList([nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)])
        self.head = nn.Linear(width * 16, num_classes)
        self.router = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                    nn.Flatten(), nn.Linear(32, len(self.convs) * num_experts))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.convs.parameters(), *self.head.parameters()]

    def router_logits(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        """``[B, L, E]`` router logits."""
        return self.router(x_B1HW).view(x_B1HW.shape[0], len(self.convs), self.num_experts)

    def expert_ids(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        """``[B·L, 1]``: the expert each image uses in each layer (rows for :func:`routing_flip_rate`)."""
        return self.router_logits(x_B1HW).argmax(-1).reshape(-1, 1)

    def forward(self, x_B1HW: torch.Tensor, route: str = "top1") -> torch.Tensor:
        scores_BLE = torch.softmax(self.router_logits(x_B1HW), dim=-1)
        if route == "top1":
            mask_BLE = ste_top1(scores_BLE)
        elif route == "runner_up":
            k = min(2, self.num_experts)
            mask_BLE = F.one_hot(scores_BLE.topk(k, -1).indices[..., k - 1], self.num_experts).float()
        else:
            mask_BLE = torch.ones_like(scores_BLE)
        h = x_B1HW
        for layer, conv in enumerate(self.convs):
            mask_BC = mask_BLE[:, layer].repeat_interleave(self.group, dim=-1)
            h = F.relu(conv(h) * mask_BC[:, :, None, None])
        h = F.max_pool2d(h, 2)
        return self.head(h.flatten(1))

    def active_conv_macs(self) -> int:
        """Multiply-accumulates of the conv layers for one image when only the selected groups are computed."""
        g = self.group
        return 64 * 9 * (1 * g + g * g)  # layer 2 reads only the selected group's channels (others are zero)


def _kl(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_adv ‖ p_clean)`` summed (the TRADES form: log-probs of the adversarial, probs of the clean)."""
    return F.kl_div(F.log_softmax(adv_logits, -1), F.softmax(clean_logits, -1), reduction="sum")


def _trades_adv(model: MoECNN, x: torch.Tensor, cfg: AdvMoEConfig, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        f_clean, r_clean = model(x), model.router_logits(x)

    def loss(xa: torch.Tensor) -> torch.Tensor:
        return _kl(model(xa), f_clean) + _kl(model.router_logits(xa), r_clean)
    return pgd_attack(loss, x, eps=cfg.eps, step=cfg.eps * 5 / 8, steps=cfg.train_pgd_steps, random_start=1e-3,
                      generator=gen)


def expert_step(model: MoECNN, x: torch.Tensor, y: torch.Tensor, cfg: AdvMoEConfig, opt_backbone,
                gen: torch.Generator) -> float:
    """(a): ``CE(f(x), y) + β·KL(f(x_adv)‖f(x))/B``, stepping the backbone only."""
    model.train()
    x_adv = _trades_adv(model, x, cfg, gen)
    logits = model(x)
    loss = F.cross_entropy(logits, y) + cfg.beta * _kl(model(x_adv), logits) / x.shape[0]
    model.zero_grad(set_to_none=True)
    loss.backward()
    opt_backbone.step()
    return float(loss.detach())


def router_step(model: MoECNN, x: torch.Tensor, y: torch.Tensor, cfg: AdvMoEConfig, opt_router,
                gen: torch.Generator) -> float:
    """(b): ``α·CE(r(x), y mod E) + β·KL(r(x_adv)‖r(x))/B`` summed over layers, stepping the router only."""
    model.train()
    x_adv = _trades_adv(model, x, cfg, gen)
    r_BLE = model.router_logits(x)
    num_layers = r_BLE.shape[1]
    target_BL = (y % model.num_experts)[:, None].expand(-1, num_layers)
    loss = (cfg.alpha * F.cross_entropy(r_BLE.reshape(-1, model.num_experts), target_BL.reshape(-1)) * num_layers
            + cfg.beta * _kl(model.router_logits(x_adv), r_BLE) / x.shape[0])
    model.zero_grad(set_to_none=True)
    loss.backward()
    opt_router.step()
    return float(loss.detach())


def trades_round(model: MoECNN, x: torch.Tensor, y: torch.Tensor, cfg: AdvMoEConfig, opt_backbone, opt_router,
                 gen: torch.Generator) -> tuple[float, float]:
    """One alternating round: (a) expert step, then (b) router step (none with one expert). Returns the losses."""
    loss_e = expert_step(model, x, y, cfg, opt_backbone, gen)
    loss_r = router_step(model, x, y, cfg, opt_router, gen) if model.num_experts > 1 else 0.0
    return loss_e, loss_r


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits in [0, 1]: a seeded 75/25 split (no download)."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train_model(num_experts: int, width_ratio: float, cfg: AdvMoEConfig, seed: int, data) -> MoECNN:
    x_tr, y_tr, _, _ = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MoECNN(cfg.channels, num_experts, width_ratio)
    steps = cfg.epochs * math.ceil(len(y_tr) / cfg.batch_size)
    opt_b = torch.optim.SGD(model.backbone_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    opt_r = torch.optim.SGD(model.router.parameters(), lr=cfg.lr, momentum=0.9)
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in (opt_b, opt_r)][:1 + (num_experts > 1)]
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(y_tr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            trades_round(model, x_tr[idx], y_tr[idx], cfg, opt_b, opt_r, gen)
            for s in sched:
                s.step()
    return model.eval()


def evaluate(model: MoECNN, cfg: AdvMoEConfig, data) -> dict:
    _, _, x_te, y_te = data
    x_adv = pgd_ce(model, x_te, y_te, eps=cfg.eps, steps=cfg.eval_pgd_steps)
    with torch.no_grad():
        out = {"clean_acc": float((model(x_te).argmax(-1) == y_te).float().mean()),
               "pgd_acc": float((model(x_adv).argmax(-1) == y_te).float().mean()),
               "routing_flip_rate": routing_flip_rate(model.expert_ids(x_te), model.expert_ids(x_adv)),
               "runner_up_clean_acc": float((model(x_te, "runner_up").argmax(-1) == y_te).float().mean())}
    out["lipschitz_estimate"] = lipschitz_estimate(model, x_te[:128], num_dirs=4, radius=1e-2)
    out["active_conv_macs"] = model.active_conv_macs()
    return out


@register_app("advmoe", config=AdvMoEConfig, requires=("sklearn",),
              summary="AdvMoE + MoE robustness (§35/§36): TRADES-trained top-1 MoE CNN vs dense CNN on digits; "
                      "PGD accuracy, routing flips, Lipschitz")
def run(config: AdvMoEConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "advmoe", config)
    models = {"dense": (1, 1.0), "moe": (config.num_experts, config.width_ratio)}
    results: dict[str, list[dict]] = {k: [] for k in models}
    for seed in range(config.seeds):
        data = load_digits(seed)
        for name, (e, ratio) in models.items():
            m = evaluate(train_model(e, ratio, config, seed, data), config, data)
            results[name].append(m)
            rec.log({"seed": seed, "model": name, **m})
        rec.flush_metrics()
    med = {k: {f: median([r[f] for r in rs]) for f in rs[0]} for k, rs in results.items()}
    diffs = [m["pgd_acc"] - d["pgd_acc"] for m, d in zip(results["moe"], results["dense"], strict=True)]

    def draw(fig, ax):
        for i, (k, rs) in enumerate(results.items()):
            ax.scatter([r["clean_acc"] for r in rs], [r["pgd_acc"] for r in rs], label=k, color=f"C{i}")
        ax.set_xlabel("clean accuracy")
        ax.set_ylabel(f"PGD-{config.eval_pgd_steps} accuracy (eps={config.eps})")
        ax.set_title("Dense vs top-1 MoE CNN, TRADES-trained on digits (one point per seed)")
        ax.legend()
        ax.grid(alpha=0.3)
    rec.plot("robustness", draw)
    return rec.finish({"app": "advmoe", "seeds": config.seeds, "median": med,
                       "moe_minus_dense_pgd_acc": diffs, "moe_minus_dense_pgd_acc_median": median(diffs),
                       "active_compute_ratio_moe_over_dense": med["moe"]["active_conv_macs"]
                       / med["dense"]["active_conv_macs"]})
