"""Study plots (matplotlib, optional): validation curves with seed bands, and loss against training FLOPs.

Curves are averaged over the seeds at the validation steps every seed of an arm has (equal for step budgets;
for a time budget, seeds that ran at different speeds share only the steps all of them reached). The band is
± one sample sd over seeds (none with a single seed).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..training.plots import _pyplot
from .runner import RunOutcome
from .study import Study

__all__ = ["plot_study", "mean_curve"]


def mean_curve(outcomes: list[RunOutcome], key: str = "val_bpb") -> tuple[list[int], list[float], list[float]]:
    """``(steps, mean, sd)`` over the finished runs, at the validation steps they all share."""
    curves = [{r["step"]: r[key] for r in o.val_curve} for o in outcomes if o.finished]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    means = [statistics.fmean(c[s] for c in curves) for s in steps]
    sds = [statistics.stdev([c[s] for c in curves]) if len(curves) > 1 else 0.0 for s in steps]
    return steps, means, sds


def _arm_curves(study: Study, outcomes: list[RunOutcome]):
    for i, arm in enumerate(study.arms):
        runs = [o for o in outcomes if o.spec.arm == arm.name and o.finished]
        steps, mean, sd = mean_curve(runs)
        if steps:
            spec = runs[0].spec
            yield i, arm.name, spec, steps, mean, sd, len(runs)


def _band(ax, x, mean, sd, color, label):
    ax.plot(x, mean, "o-", ms=3, color=color, label=label)
    ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color,
                    alpha=0.2, lw=0)


def plot_study(study: Study, outcomes: list[RunOutcome], out_dir: str | Path) -> list[str]:
    """Write ``val_curves.png`` (bits/byte against training tokens) and ``loss_vs_flops.png``; returns names."""
    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figs = {"val_curves.png": plt.subplots(figsize=(7, 4.2)), "loss_vs_flops.png": plt.subplots(figsize=(7, 4.2))}
    (_, ax_tok), (_, ax_fl) = figs["val_curves.png"], figs["loss_vs_flops.png"]
    for i, name, spec, steps, mean, sd, n in _arm_curves(study, outcomes):
        color, label = colors[i % len(colors)], f"{name} (n={n})"
        tokens = [s * spec.tokens_per_step for s in steps]
        _band(ax_tok, tokens, mean, sd, color, label)
        _band(ax_fl, [t * spec.flops_per_token for t in tokens], mean, sd, color, label)
    budget = study.budget.describe()
    for ax, xlabel in ((ax_tok, "training tokens"), (ax_fl, "training FLOPs (moekit.models.count)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits / byte")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_tok.set_title(f"{study.name}: mean ± sd over seeds; {budget}", fontsize=9)
    ax_fl.set_title(f"{study.name}: loss against compute", fontsize=9)
    ax_fl.set_xscale("log")
    written = []
    for name, (fig, _) in figs.items():
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
