"""PNG plots of a :class:`~moekit.analysis.routing.RoutingReport` (matplotlib, headless ``Agg`` backend).

- ``load.png``: share of assignments per expert, one row per layer (dead experts marked with x);
- ``coactivation.png``: per layer, ``P(expert j chosen | expert i chosen)`` with the diagonal removed;
- ``entropy.png``: per layer, normalised load entropy and mean token routing entropy, and dead experts.
"""

from __future__ import annotations

import math
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
                 dead: list[tuple[int, int]] = ()) -> None:
    """Heatmap of per-expert load relative to uniform, one row per layer (rows may differ in length)."""
    width = max(len(r) for r in rows)
    grid = [list(r) + [float("nan")] * (width - len(r)) for r in rows]
    fig, ax = plt.subplots(figsize=(min(max(4, 2 + 0.35 * width), 16), max(2.5, 1.5 + 0.4 * len(rows))))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    for row, expert in dead:
        ax.plot(expert, row, "rx")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load(plt, report: RoutingReport, path: Path) -> None:
    rows = [(r.load_E.float() * r.load_E.numel()).tolist() for r in report.layers]
    dead = [(i, e) for i, r in enumerate(report.layers) for e in r.dead_experts]
    load_heatmap(plt, rows, [r.name for r in report.layers], "load relative to uniform (1 = balanced, x = dead)",
                 path, dead)


def _coactivation(plt, report: RoutingReport, path: Path, max_layers: int) -> None:
    layers = report.layers[:max_layers]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, layers):
        c = r.coactivation_EE.clone()
        cond = c / c.diag().clamp_min(1e-12)[:, None]
        cond.fill_diagonal_(float("nan"))
        ax.axis("on")
        im = ax.imshow(cond.numpy(), vmin=0, vmax=1, cmap="magma")
        ax.set_title(r.name, fontsize=7)
        ax.set_xlabel("j", fontsize=7)
        ax.set_ylabel("i", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="P(j | i)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _entropy(plt, report: RoutingReport, path: Path) -> None:
    x = range(len(report.layers))
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(report.layers) + 2), 3.5))
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
    fig.legend(loc="lower left", fontsize=7, framealpha=0.9)
    fig.tight_layout()
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
