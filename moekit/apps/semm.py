"""SEMM (spec §37, NeurIPS'24 text): spiking experts mixture in a spiking MLP (EMSP), on scikit-learn's digits.

Spiking neurons (:class:`LIF`): multi-step leaky integrate-and-fire, ``v_t = v_{t-1} + (x_t − v_{t-1}) / τ``,
spike ``s_t = H(v_t − v_th)`` (Heaviside forward, exactly 0/1), hard reset ``v_t ← v_t·(1 − s_t)``. The backward
pass uses the sigmoid surrogate ``∂s/∂v = α·σ(α(v − v_th))·(1 − σ(α(v − v_th)))`` (:class:`SpikeFn`).

SEMM block (:class:`SEMMBlock`, the spec's EMSP): the router is a spiking layer ``R = SN(BN(Linear(X)))`` with one
spike per expert, ``R ∈ {0,1}^{E}``, and each expert is a spiking channel group ``E_i = SN(BN(Linear_i(X))) ∈
{0,1}^{D}``. The mixture is ``Y = Σ_i R_i ⊙ E_i``: element-wise, no softmax, no top-k and no normalisation, so
sparsity comes from the spikes only. Choice (the spec leaves the granularity open): one router spike per expert
per sample and time step, broadcast over that expert's D channels. The baseline (``router=False``) is the same
network with ``R ≡ 1`` (a plain spiking MLP summing the same expert groups); moekit's top-k ``Router`` is not used
because SEMM's router is by definition a spiking layer without softmax or top-k.

Network: direct (analogue) input encoding repeated over T steps → ``h = SN(BN(Linear(64→H)))`` → the spiking
MLP with a residual shortcut as in a Spiking Transformer block, ``z = h + BN(Linear(SEMM(h)))`` (D → H) →
``Linear(H→10)`` → logits averaged over the T steps (rate decoding), trained with cross-entropy.
The spec's EMSA variant (experts as attention heads) is not built.

Dims: T time steps, B samples, H input hidden width, E experts, D expert width, C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import AppRun, check_field, median
from .registry import register_app, require

__all__ = ["LIF", "SEMMBlock", "SEMMConfig", "SEMMNet", "SpikeFn", "run", "spike", "train_eval"]


@dataclass(frozen=True, kw_only=True)
class SEMMConfig:
    """SEMM application settings; SEMM (``router=True``) is compared with the same net at ``R ≡ 1``."""

    seeds: int = 3
    time_steps: int = 4
    hidden: int = 64
    num_experts: int = 4
    expert_dim: int = 32
    tau: float = 2.0
    threshold: float = 1.0
    surrogate_alpha: float = 4.0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "time_steps", "hidden", "num_experts", "expert_dim", "epochs", "batch_size"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(self.tau >= 1, n, "tau", self.tau, ">= 1 (membrane time constant in steps)")
        for f in ("threshold", "surrogate_alpha", "lr"):
            check_field(getattr(self, f) > 0, n, f, getattr(self, f), "> 0")


class SpikeFn(torch.autograd.Function):
    """Heaviside ``H(u) = 1[u ≥ 0]`` forward; sigmoid-surrogate gradient ``α·σ(αu)(1 − σ(αu))`` backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (u,) = ctx.saved_tensors
        sg = torch.sigmoid(ctx.alpha * u)
        return grad * ctx.alpha * sg * (1 - sg), None


def spike(u: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    return SpikeFn.apply(u, alpha)


class LIF(nn.Module):
    """Multi-step LIF neuron over inputs ``x_TBD`` → spikes ``s_TBD ∈ {0,1}`` (hard reset to 0)."""

    def __init__(self, tau: float = 2.0, threshold: float = 1.0, alpha: float = 4.0) -> None:
        super().__init__()
        self.tau, self.threshold, self.alpha = tau, threshold, alpha

    def forward(self, x_TBD: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x_TBD[0])
        out = []
        for x in x_TBD:
            v = v + (x - v) / self.tau
            s = spike(v - self.threshold, self.alpha)
            v = v * (1 - s)
            out.append(s)
        return torch.stack(out)


class _SpikingLinear(nn.Module):
    """``SN(BN(Linear(x)))`` over ``[T, B, ·]`` (BatchNorm over T·B rows)."""

    def __init__(self, d_in: int, d_out: int, lif: LIF) -> None:
        super().__init__()
        self.fc, self.bn, self.lif = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), lif

    def forward(self, x_TBI: torch.Tensor) -> torch.Tensor:
        t, b, _ = x_TBI.shape
        return self.lif(self.bn(self.fc(x_TBI).flatten(0, 1)).view(t, b, -1))


class SEMMBlock(nn.Module):
    """EMSP: ``Y_TBD = Σ_i R_TBi ⊙ E_TBiD`` with spiking router ``R`` and spiking experts ``E`` (both 0/1).

    ``forward`` returns ``Y``; with ``return_parts`` also ``(R_TBE, E_TBED)``. ``router=False``: ``R ≡ 1``.
    """

    def __init__(self, dim: int, num_experts: int, expert_dim: int, *, router: bool = True, tau: float = 2.0,
                 threshold: float = 1.0, alpha: float = 4.0) -> None:
        super().__init__()
        self.num_experts, self.expert_dim = num_experts, expert_dim
        # all experts in one Linear (E·D outputs, BN per channel): expert i owns channels [i·D, (i+1)·D)
        self.experts = _SpikingLinear(dim, num_experts * expert_dim, LIF(tau, threshold, alpha))
        self.router = _SpikingLinear(dim, num_experts, LIF(tau, threshold, alpha)) if router else None

    def forward(self, x_TBH: torch.Tensor, return_parts: bool = False):
        t, b, _ = x_TBH.shape
        e_TBED = self.experts(x_TBH).view(t, b, self.num_experts, self.expert_dim)
        r_TBE = self.router(x_TBH) if self.router is not None else x_TBH.new_ones(t, b, self.num_experts)
        y_TBD = (r_TBE[..., None] * e_TBED).sum(2)
        return (y_TBD, r_TBE, e_TBED) if return_parts else y_TBD


class SEMMNet(nn.Module):
    """Digits classifier: input spiking layer → residual SEMM spiking MLP → linear readout, logits averaged over T."""

    def __init__(self, cfg: SEMMConfig, *, router: bool = True, in_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.time_steps = cfg.time_steps
        lif = LIF(cfg.tau, cfg.threshold, cfg.surrogate_alpha)
        self.inp = _SpikingLinear(in_dim, cfg.hidden, lif)
        self.block = SEMMBlock(cfg.hidden, cfg.num_experts, cfg.expert_dim, router=router, tau=cfg.tau,
                               threshold=cfg.threshold, alpha=cfg.surrogate_alpha)
        self.proj = nn.Linear(cfg.expert_dim, cfg.hidden)
        self.proj_bn = nn.BatchNorm1d(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, num_classes)

    def forward(self, x_BF: torch.Tensor, return_rates: bool = False):
        x_TBF = x_BF.unsqueeze(0).expand(self.time_steps, *x_BF.shape)
        h_TBH = self.inp(x_TBF)
        y_TBD, r_TBE, e_TBED = self.block(h_TBH, return_parts=True)
        z_TBH = h_TBH + self.proj_bn(self.proj(y_TBD).flatten(0, 1)).view_as(h_TBH)  # residual shortcut
        logits_BC = self.head(z_TBH).mean(0)
        if return_rates:
            return logits_BC, {"router_rate": float(r_TBE.mean()), "expert_rate": float(e_TBED.mean()),
                               "mixture_nonzero": float((y_TBD != 0).float().mean())}
        return logits_BC


def load_digits_flat(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits, 64 pixels in [0, 1], seeded 75/25 split (no download)."""
    from .advmoe import load_digits
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    return x_tr.flatten(1), y_tr, x_te.flatten(1), y_te


def train_eval(cfg: SEMMConfig, seed: int, router: bool, data=None) -> dict:
    """Train one net (Adam, cosine schedule) and return test accuracy and spike rates."""
    x_tr, y_tr, x_te, y_te = data if data is not None else load_digits_flat(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SEMMNet(cfg, router=router)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * math.ceil(len(y_tr) / cfg.batch_size))
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(y_tr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows per channel in training
                continue
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        logits, rates = model(x_te, return_rates=True)
    return {"accuracy": float((logits.argmax(-1) == y_te).float().mean()), **rates}


@register_app("semm", config=SEMMConfig, requires=("sklearn",),
              summary="SEMM (§37): spiking experts mixed by a spiking router (surrogate gradients) on digits, "
                      "vs the same spiking MLP without the router")
def run(config: SEMMConfig, out_dir: Path) -> dict:
    require("sklearn")
    rec = AppRun(out_dir, "semm", config)
    kinds = {"spiking_mlp": False, "semm": True}
    res: dict[str, list[dict]] = {k: [] for k in kinds}
    for seed in range(config.seeds):
        data = load_digits_flat(seed)
        for kind, router in kinds.items():
            m = train_eval(config, seed, router, data)
            res[kind].append(m)
            rec.log({"seed": seed, "model": kind, **m})
    med = {k: {f: median([r[f] for r in rs]) for f in rs[0]} for k, rs in res.items()}

    def draw(fig, ax):
        for i, k in enumerate(kinds):
            ax.scatter([i] * len(res[k]), [r["accuracy"] for r in res[k]], color=f"C{i}")
        ax.set_xticks(range(len(kinds)), list(kinds))
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Spiking nets on digits (T={config.time_steps}), one point per seed")
        ax.grid(alpha=0.3)
    rec.plot("accuracy", draw)
    gain = [s["accuracy"] - b["accuracy"] for s, b in zip(res["semm"], res["spiking_mlp"], strict=True)]
    return rec.finish({"app": "semm", "seeds": config.seeds, "median": med, "semm_minus_baseline_accuracy": gain,
                       "semm_minus_baseline_accuracy_median": median(gain)})
