"""Adversarial-robustness harness for MoE models (spec §36, "On the Adversarial Robustness of MoE" [abs]).

- :func:`pgd_attack`: L-inf projected gradient ascent on a loss of the model's output;
- :func:`routing_flip_rate`: the fraction of rows (tokens, or image-layer pairs) whose selected expert set
  changes between clean and adversarial input;
- :func:`lipschitz_estimate`: an empirical Lipschitz constant, the largest finite-difference ratio
  ``||f(x + δ) − f(x)|| / ||δ||`` over the given points and seeded random directions (seeded, so two functions
  that agree everywhere get the same estimate).

The expert-substitution probe needs the model's own routing and lives with the model
(:meth:`moekit.apps.advmoe.MoECNN.forward` with ``route="runner_up"``).

Dims: N inputs (any trailing shape), K selected experts per row, R rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["lipschitz_estimate", "pgd_attack", "routing_flip_rate"]


def pgd_attack(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, eps: float, step: float,
               steps: int, lo: float = 0.0, hi: float = 1.0, random_start: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Maximise ``loss_fn(x_adv)`` (a scalar) over the L-inf ball of radius ``eps`` around ``x`` within
    ``[lo, hi]``, by ``steps`` signed-gradient steps of size ``step``. ``eps = 0`` returns ``x`` unchanged."""
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    noise = torch.randn(x.shape, generator=generator) if random_start else torch.zeros_like(x)
    x_adv = (x + random_start * noise).clamp(lo, hi)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(lo, hi)
    return x_adv.detach()


def pgd_ce(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *, eps: float,
           steps: int = 10) -> torch.Tensor:
    """The usual evaluation attack: PGD on the cross-entropy, step ``eps / 4``."""
    return pgd_attack(lambda xa: F.cross_entropy(model(xa), y, reduction="sum"), x, eps=eps, step=eps / 4,
                      steps=steps)


def routing_flip_rate(ids_clean_RK: torch.Tensor, ids_adv_RK: torch.Tensor) -> float:
    """Fraction of rows whose *set* of selected experts differs (order within the top-k does not count)."""
    if ids_clean_RK.shape != ids_adv_RK.shape:
        raise ValueError(f"routing shapes differ: {tuple(ids_clean_RK.shape)} vs {tuple(ids_adv_RK.shape)}")
    if ids_clean_RK.numel() == 0:
        return 0.0
    a, _ = ids_clean_RK.sort(dim=-1)
    b, _ = ids_adv_RK.sort(dim=-1)
    return float((a != b).any(dim=-1).float().mean())


@torch.no_grad()
def lipschitz_estimate(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, num_dirs: int = 8,
                       radius: float = 1e-2, seed: int = 0) -> float:
    """``max_{n, j} ||fn(x_n + r·u_j) − fn(x_n)|| / r`` over unit directions ``u_j`` (per input, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    base = fn(x).flatten(1)
    best = 0.0
    for _ in range(num_dirs):
        u = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        ratio = (fn(x + radius * u).flatten(1) - base).norm(dim=1) / radius
        best = max(best, float(ratio.max()))
    return best
