"""Study plots (matplotlib, optional): validation curves with seed bands, and loss against training FLOPs.

Curves are averaged over the seeds at the validation steps every seed of an arm has (equal for step budgets;
for a time budget, seeds that ran at different speeds share only the steps all of them reached). The band is
± one sample sd over seeds (none with a single seed).

A time budget also gets ``val_vs_time.png``: bits/byte against the budget's clock (training-step CPU seconds
for ``clock = "cpu"``, wall seconds otherwise), at the validation steps every seed of an arm reached plus the
final validation; x is the mean over seeds of each point's clock reading.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..training.plots import _pyplot
from .runner import RunOutcome
from .study import Study

__all__ = ["plot_study", "mean_curve", "mean_time_curve"]


def mean_curve(outcomes: list[RunOutcome], key: str = "val_bpb") -> tuple[list[int], list[float], list[float]]:
    """``(steps, mean, sd)`` over the finished runs, at the validation steps they all share."""
    curves = [{r["step"]: r[key] for r in o.val_curve} for o in outcomes if o.finished]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    means = [statistics.fmean(c[s] for c in curves) for s in steps]
    sds = [statistics.stdev([c[s] for c in curves]) if len(curves) > 1 else 0.0 for s in steps]
    return steps, means, sds


def mean_time_curve(outcomes: list[RunOutcome], clock_key: str = "cpu_time",
                    key: str = "val_bpb") -> tuple[list[float], list[float], list[float]]:
    """``(seconds, mean, sd)`` over the finished runs of one arm under a time budget.

    Points: the validation steps every run reached before its last, then each run's final validation (runs
    stop at different steps when the clock ends them). ``seconds`` is the mean over runs of ``clock_key``
    (``cpu_time`` or ``elapsed``) at each point; runs whose records lack it are left out.
    """
    curves = [o.val_curve for o in outcomes if o.finished and o.val_curve and clock_key in o.val_curve[-1]]
    if not curves:
        return [], [], []
    by_step = [{r["step"]: r for r in c[:-1] if clock_key in r} for c in curves]
    shared = sorted(set.intersection(*(set(c) for c in by_step)))
    points = [[c[s] for c in by_step] for s in shared] + [[c[-1] for c in curves]]
    xs = [statistics.fmean(r[clock_key] for r in rows) for rows in points]
    means = [statistics.fmean(r[key] for r in rows) for rows in points]
    sds = [statistics.stdev([r[key] for r in rows]) if len(rows) > 1 else 0.0 for rows in points]
    return xs, means, sds


def _time_plot(plt, study: Study, outcomes: list[RunOutcome], colors: list, path: Path) -> None:
    clock_key = "cpu_time" if study.budget.clock == "cpu" else "elapsed"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(study.arms):
        runs = [o for o in outcomes if o.spec.arm == arm.name and o.finished]
        xs, mean, sd = mean_time_curve(runs, clock_key)
        if xs:
            _band(ax, xs, mean, sd, colors[i % len(colors)], f"{arm.name} (n={len(runs)})")
    ax.set_xlabel("CPU seconds of training steps per run" if clock_key == "cpu_time" else "wall seconds")
    ax.set_ylabel("validation bits / byte")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_title(f"{study.name}: mean ± sd over seeds; {study.budget.describe()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    if study.budget.kind == "time":
        _time_plot(plt, study, outcomes, colors, out_dir / "val_vs_time.png")
        written.append("val_vs_time.png")
    for name, (fig, _) in figs.items():
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
