"""PNG plots of a run: loss curves, and expert load per layer as a heatmap (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_run"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    return plt


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_loss(plt, records: list[dict], path: Path) -> None:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], color="tab:blue", alpha=0.25, lw=0.8)
        # Memory of about n/20 steps (2 to 20): a long EMA would lag far behind the curve of a short run.
        alpha = min(0.5, max(0.05, 20 / len(train)))
        ax.plot(steps, _ema([r["loss"] for r in train], alpha), color="tab:blue", label="train (EMA)")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange",
                label="validation")
    ax.set_title("Loss: training (faint: per step) and validation", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    """Save a PNG atomically (never through a symlink planted at ``path``)."""
    from .checkpoint import write_atomic
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=110))


def plot_expert_load(plt, load: dict[str, list[float]], path: Path) -> None:
    """Heatmap of each expert's share of assignments times E (1.0 = perfectly balanced)."""
    from ..analysis.plots import load_heatmap
    rows = [[c * len(counts) / (sum(counts) or 1) for c in counts] for counts in load.values()]
    from .checkpoint import write_atomic
    write_atomic(Path(path), lambda tmp: load_heatmap(plt, rows, list(load),
                                                      "Expert load on validation data (share x E; 1 = balanced)", tmp))


def plot_run(out_dir: Path, records: list[dict], load: dict[str, list[float]]) -> list[Path]:
    """Write ``loss.png`` and, for a model with MoE layers, ``expert_load.png``; returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    written = [out_dir / "loss.png"]
    plot_loss(plt, records, written[0])
    if load:
        written.append(out_dir / "expert_load.png")
        plot_expert_load(plt, load, written[1])
    return written
