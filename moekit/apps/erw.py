"""ERW — embedded representation warmup (no spec section; the issue's summary is the spec): warm the early layers
of a small diffusion model from a pretrained representation encoder, then train; how much faster it converges.

Data: scikit-learn's bundled 8×8 digits, pixels scaled to ``[−1, 1]`` (``[N, 64]``), a seeded 75/25 split.

Representation encoder (:class:`Encoder`, "pretrained" here: a choice, no pretrained weights ship offline): the
two-layer GELU MLP ``r(x) = σ(W₂ σ(W₁ x + b₁) + b₂)`` (``[N, H]``), trained as a digit classifier (linear head) on
the training split with Gaussian-noise augmentation, then frozen.

Diffusion model (:class:`Denoiser`, DDPM ε-prediction, cosine ``ᾱ(t)``, ``T`` steps): early layers
``e(x_t, t) = σ(W₂ σ(W₁ x_t + U τ(t) + b₁) + b₂)`` — the encoder's shape plus the time input ``U τ(t)`` — then late
layers ``ε̂ = L(e + V τ(t))`` (two GELU layers and a linear output). ERW (choices ours, after the paper's
abstract):

1. *embed*: ``W₁, b₁, W₂, b₂`` are copied from the encoder; ``U`` starts at zero, so ``e(x, t) = r(x)``.
2. *warmup* (``warmup_steps``, counted in ERW's step budget): only the early layers are trained, to map noisy
   inputs to the clean representation, ``||e(x_t, t) − r(x_0)||²``.
3. *train*: the diffusion loss ``||ε̂ − ε||²`` plus ``align_coef · λ(s) · ||e(x_t, t) − r(x_0)||²``, ``λ`` decaying
   linearly from 1 to 0 over the first half of training.

From scratch: the same denoiser, default initialisation, diffusion loss only, the same step budget. Convergence
is read from the held-out denoising loss (fixed noise and times, every ``eval_every`` steps): the steps each run
needs to reach the loss scratch has at the end, and their ratio (the speed-up).

Dims: N images, P = 64 pixels, H hidden, E time embedding.
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

__all__ = ["Denoiser", "ERWConfig", "Encoder", "alpha_bar", "diffusion_loss", "embed_encoder", "pretrain_encoder",
           "run", "steps_to_reach", "train_diffusion"]


@dataclass(frozen=True, kw_only=True)
class ERWConfig:
    """ERW application settings."""

    seeds: int = 3
    hidden: int = 256
    time_dim: int = 32
    diffusion_steps: int = 200
    encoder_epochs: int = 30
    train_steps: int = 1500
    warmup_steps: int = 100
    align_coef: float = 1.0
    batch_size: int = 128
    lr: float = 1e-3
    eval_every: int = 50

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "hidden", "time_dim", "diffusion_steps", "encoder_epochs", "train_steps", "batch_size",
                  "eval_every"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(0 <= self.warmup_steps < self.train_steps, n, "warmup_steps", self.warmup_steps,
                    f"in [0, train_steps={self.train_steps})")
        check_field(self.time_dim % 2 == 0, n, "time_dim", self.time_dim, "an even number")
        check_field(self.align_coef >= 0, n, "align_coef", self.align_coef, ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")


def alpha_bar(t_N: torch.Tensor, steps: int) -> torch.Tensor:
    """Cosine schedule ``ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2) / cos²(s/(1 + s)·π/2)``, ``s = 0.008``, clipped."""
    s = 0.008
    f = torch.cos(((t_N.float() / steps) + s) / (1 + s) * math.pi / 2) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(1e-4, 0.9999)


def time_embedding(t_N: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[N, E]``."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2) / (dim // 2))
    ang = t_N.float()[:, None] * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)


class Encoder(nn.Module):
    """``r(x) = GELU(W₂ GELU(W₁ x + b₁) + b₂)`` ``[N, H]`` and a linear digit head."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x_NP: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x_NP))))


class Denoiser(nn.Module):
    """ε-prediction MLP: early layers (encoder-shaped, plus a time input) → late layers."""

    def __init__(self, hidden: int, time_dim: int) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, hidden)
        self.time_in = nn.Linear(time_dim, hidden, bias=False)
        self.time_late = nn.Linear(time_dim, hidden)
        self.late = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                  nn.GELU(), nn.Linear(hidden, 64))

    def early(self, x_NP: torch.Tensor, t_N: torch.Tensor) -> torch.Tensor:
        tau = time_embedding(t_N, self.time_dim)
        return F.gelu(self.fc2(F.gelu(self.fc1(x_NP) + self.time_in(tau))))

    def forward(self, x_NP: torch.Tensor, t_N: torch.Tensor) -> torch.Tensor:
        e = self.early(x_NP, t_N)
        return self.late(e + self.time_late(time_embedding(t_N, self.time_dim)))

    def early_parameters(self) -> list[nn.Parameter]:
        return [*self.fc1.parameters(), *self.fc2.parameters(), *self.time_in.parameters()]


def embed_encoder(model: Denoiser, enc: Encoder) -> None:
    """ERW's embedding: the encoder's layers into the early layers; the time input starts at zero."""
    with torch.no_grad():
        model.fc1.load_state_dict(enc.fc1.state_dict())
        model.fc2.load_state_dict(enc.fc2.state_dict())
        model.time_in.weight.zero_()


def load_digits_pm1(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``, pixels in ``[−1, 1]``, a seeded 75/25 split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = int(0.75 * len(y))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def pretrain_encoder(x: torch.Tensor, y: torch.Tensor, cfg: ERWConfig, seed: int) -> Encoder:
    """The representation encoder: a digit classifier with noise augmentation (std 0.3), then frozen."""
    torch.manual_seed(seed + 100)
    enc = Encoder(cfg.hidden)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(cfg.encoder_epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = x[idx] + 0.3 * torch.randn(len(idx), 64, generator=gen)
            loss = F.cross_entropy(enc.head(enc(xb)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    enc.requires_grad_(False)
    return enc.eval()


def _noisy(x0: torch.Tensor, cfg: ERWConfig, gen: torch.Generator):
    t = torch.randint(1, cfg.diffusion_steps + 1, (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    ab = alpha_bar(t, cfg.diffusion_steps)[:, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, eps


def diffusion_loss(model: Denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, steps: int
                   ) -> torch.Tensor:
    """``mean ||ε̂(√ᾱ x₀ + √(1−ᾱ) ε, t) − ε||²``."""
    ab = alpha_bar(t, steps)[:, None]
    return F.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t), eps)


def train_diffusion(cfg: ERWConfig, seed: int, data, enc: Encoder | None) -> list[tuple[int, float]]:
    """Train from scratch (``enc`` None) or with ERW; the held-out loss curve ``[(step, loss), ...]``."""
    x_tr, _, x_te, _ = data
    torch.manual_seed(seed)
    model = Denoiser(cfg.hidden, cfg.time_dim)
    gen = torch.Generator().manual_seed(seed)
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    t_ev = torch.randint(1, cfg.diffusion_steps + 1, (len(x_te),), generator=eval_gen)
    eps_ev = torch.randn(x_te.shape, generator=eval_gen)
    warm = cfg.warmup_steps if enc is not None else 0
    if enc is not None:
        embed_encoder(model, enc)
    opt_early = torch.optim.Adam(model.early_parameters(), lr=cfg.lr)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve = []
    for step in range(cfg.train_steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.train_steps:
            with torch.no_grad():
                curve.append((step, float(diffusion_loss(model, x_te, t_ev, eps_ev, cfg.diffusion_steps))))
        if step == cfg.train_steps:
            break
        idx = torch.randint(0, len(x_tr), (cfg.batch_size,), generator=gen)
        x0 = x_tr[idx]
        xt, t, eps = _noisy(x0, cfg, gen)
        if step < warm:
            assert enc is not None
            loss = F.mse_loss(model.early(xt, t), enc(x0))
            opt_early.zero_grad()
            loss.backward()
            opt_early.step()
            continue
        loss = F.mse_loss(model(xt, t), eps)
        if enc is not None:
            loss = loss + align_weight(cfg, step - warm) * F.mse_loss(model.early(xt, t), enc(x0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def align_weight(cfg: ERWConfig, step: int) -> float:
    """``align_coef · λ(s)``, ``λ`` linear from 1 to 0 over the first half of the diffusion phase."""
    half = max(1, (cfg.train_steps - cfg.warmup_steps) // 2)
    return cfg.align_coef * max(0.0, 1.0 - step / half)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose held-out loss is ``<= target`` (None if never)."""
    return next((s for s, v in curve if v <= target), None)


@register_app("erw", config=ERWConfig, requires=("sklearn",),
              summary="ERW (no spec): diffusion MLP on digits whose early layers are embedded from a pretrained "
                      "representation encoder and warmed up, vs from scratch: steps to the same denoising loss")
def run(config: ERWConfig, out_dir: Path) -> dict:
    rec = AppRun(out_dir, "erw", config)
    curves: dict[str, list] = {"scratch": [], "erw": []}
    speedups, reach = [], []
    for seed in range(config.seeds):
        data = load_digits_pm1(seed)
        enc = pretrain_encoder(data[0], data[1], config, seed)
        with torch.no_grad():
            enc_acc = float((enc.head(enc(data[2])).argmax(-1) == data[3]).float().mean())
        sc = train_diffusion(config, seed, data, None)
        ew = train_diffusion(config, seed, data, enc)
        curves["scratch"].append(sc)
        curves["erw"].append(ew)
        target = sc[-1][1]
        s_sc, s_ew = steps_to_reach(sc, target), steps_to_reach(ew, target)
        speed = (s_sc / s_ew) if s_ew and s_sc else None
        speedups.append(speed)
        reach.append(s_ew)
        rec.log({"seed": seed, "encoder_test_accuracy": enc_acc, "scratch_final_loss": target,
                 "erw_final_loss": ew[-1][1], "scratch_steps_to_target": s_sc, "erw_steps_to_target": s_ew,
                 "speedup": speed, "scratch_curve": sc, "erw_curve": ew})

    def draw(fig, ax):
        for i, k in enumerate(("scratch", "erw")):
            for j, c in enumerate(curves[k]):
                ax.plot([s for s, _ in c], [v for _, v in c], color=f"C{i}", alpha=0.8,
                        label=k if j == 0 else None)
        ax.axvline(config.warmup_steps, color="grey", ls=":", label="ERW warmup ends")
        ax.set_yscale("log")
        ax.set_xlabel("training step (ERW's warmup steps included)")
        ax.set_ylabel("held-out ε-prediction MSE")
        ax.set_title("Diffusion MLP on 8×8 digits, one line per seed")
        ax.legend()
        ax.grid(alpha=0.3)
    rec.plot("convergence", draw)
    finite = [s for s in speedups if s is not None]
    return rec.finish({
        "app": "erw", "seeds": config.seeds,
        "median_final_loss": {k: median([c[-1][1] for c in cs]) for k, cs in curves.items()},
        "speedup": speedups, "speedup_median": median(finite) if finite else None,
        "erw_reached_scratch_final_loss": sum(s is not None for s in reach)})
