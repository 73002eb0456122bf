"""PNG plots of a :class:`~moekit.analysis.routing.RoutingReport` (matplotlib, headless ``Agg`` backend).

- ``load.png``: share of assignments per expert, one row per layer (dead experts marked with x);
- ``coactivation.png``: per layer, ``P(expert j chosen | expert i chosen)`` with the diagonal removed;
- ``entropy.png``: per layer, normalised load entropy and mean token routing entropy, and dead experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .routing import RoutingReport

__all__ = ["save_plots"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("plots need matplotlib: pip install 'moekit[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_heatmap(plt, rows: list[list[float]], names: list[str], title: str, path: Path,
                 dead: Sequence[tuple[int, int]] = ()) -> None:
    """Heatmap of per-expert load relative to uniform, one row per layer (rows may differ in length)."""
    from matplotlib.ticker import MaxNLocator
    width = max(len(r) for r in rows)
    grid = [list(r) + [float("nan")] * (width - len(r)) for r in rows]
    fig, ax = plt.subplots(figsize=(min(max(6, 2.5 + 0.35 * width), 16), max(2.8, 1.6 + 0.4 * len(rows))),
                           layout="constrained")
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for row, expert in dead:
        ax.plot(expert, row, "rx")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(width, 16), integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="load / uniform load")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(plt, report: RoutingReport, path: Path) -> None:
    rows = [(r.load_E.float() * r.load_E.numel()).tolist() for r in report.layers]
    dead = [(i, e) for i, r in enumerate(report.layers) for e in r.dead_experts]
    load_heatmap(plt, rows, [r.name for r in report.layers], "Expert load relative to uniform (1 = balanced; x = dead expert)",
                 path, dead)


def _coactivation(plt, report: RoutingReport, path: Path, max_layers: int) -> None:
    layers = report.layers[:max_layers]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 + 3.2 * cols, 0.6 + 3 * rows), squeeze=False,
                             layout="constrained")
    fig.suptitle("Expert co-activation: P(expert j also chosen | expert i chosen)", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, layers):
        c = r.coactivation_EE.clone()
        cond = c / c.diag().clamp_min(1e-12)[:, None]
        cond.fill_diagonal_(float("nan"))
        ax.axis("on")
        im = ax.imshow(cond.numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_title(r.name, fontsize=8)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="P(j | i) (diagonal left out)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _entropy(plt, report: RoutingReport, path: Path) -> None:
    x = range(len(report.layers))
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(report.layers) + 2.5), 3.8), layout="constrained")
    ax.set_title("Routing entropy per layer (divided by ln E: 1 = uniform) and dead experts", fontsize=9)
    ax.bar([i - 0.2 for i in x], [r.load_entropy for r in report.layers], 0.4, label="load entropy")
    ax.bar([i + 0.2 for i in x], [r.token_entropy for r in report.layers], 0.4, label="token entropy")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("normalised entropy")
    ax.set_xticks(list(x), [r.name for r in report.layers], rotation=45, ha="right", fontsize=7)
    twin = ax.twinx()
    dead = [len(r.dead_experts) for r in report.layers]
    twin.plot(list(x), dead, "ko-", label="dead experts")
    twin.set_ylim(0, max(dead + [1]) * 1.1)
    twin.set_ylabel("dead experts")
    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_plots(report: RoutingReport, out_dir: str | Path, max_layers: int = 16) -> list[Path]:
    """Write ``load.png``, ``coactivation.png`` and ``entropy.png`` into ``out_dir``; returns their paths."""
    if not report.layers:
        raise ValueError("the report has no layer; did the model route any token?")
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "load.png", out / "coactivation.png", out / "entropy.png"]
    _load(plt, report, paths[0])
    _coactivation(plt, report, paths[1], max_layers)
    _entropy(plt, report, paths[2])
    return paths
