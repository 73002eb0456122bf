"""Compressing a moekit run folder, and the quality-vs-memory sweep behind ``moekit compress --sweep``.

Dim legend: N calibration sequences, S sequence length (the run's context).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..data import load_data, train_batch
from ..training import load_run
from ..training.evaluate import evaluate
from .api import CompressionReport, compress, expert_bytes
from .artifact import header_of, save_compressed_run
from .calibrate import CompressionError, find_moe_layers
from .methods import METHODS

__all__ = ["SWEEP_POINTS", "calibration_tokens", "compress_run", "format_table", "sweep_run"]

# (method, options) operating points of the sweep: 2-3 per method, chosen to bracket 50% and 25% of expert bytes
SWEEP_POINTS: list[tuple[str, dict]] = [
    ("prune-frequency", {"target_memory": 0.5}), ("prune-frequency", {"target_memory": 0.25}),
    ("merge-random", {"target_memory": 0.5}), ("merge-random", {"target_memory": 0.25}),
    ("m-smoe", {"target_memory": 0.5}), ("m-smoe", {"target_memory": 0.25}),
    ("mc-smoe", {"target_memory": 0.5}), ("mc-smoe", {"target_memory": 0.25}),
    ("dern", {"target_memory": 0.5}), ("dern", {"target_memory": 0.25}),
    ("expert-merging", {"target_memory": 0.5}), ("expert-merging", {"target_memory": 0.25}),
    ("expert-merging++", {"target_memory": 0.5}), ("expert-merging++", {"target_memory": 0.25}),
    ("rtn", {"bits": 8}), ("rtn", {"bits": 4}), ("rtn", {"bits": 3}),
    ("gptq", {"bits": 4}), ("gptq", {"bits": 3}),
    ("eaquant", {"bits": 4}), ("eaquant", {"bits": 3}),
    ("d2moe-mwq", {"bits": 2, "levels": 2}), ("d2moe-mwq", {"bits": 2, "levels": 1}),
    ("qmoe", {"bits": 2}), ("qmoe", {"bits": 1.5}),
]


def calibration_tokens(run_cfg, data, num_tokens: int, seed: int = 1234) -> torch.Tensor:
    """``[N, S]`` windows of the run's *training* split (never its validation split)."""
    context = run_cfg.model.context
    n = max(1, math.ceil(num_tokens / context))
    return train_batch(data, n, context, seed=seed, step=0)[0]


def compress_run(run_dir: str | Path, method: str, out_dir: str | Path | None, *, num_tokens: int = 4096,
                 **options) -> tuple[CompressionReport, object]:
    """Load a run, compress it, and (when ``out_dir`` is given) write the compressed run folder."""
    if method not in METHODS:
        from .methods import get_method
        get_method(method)  # raises with the list of names before anything is loaded
    if method == "mote":  # trains from a dense run (spec §6) instead of transforming MoE layers
        from .mote import compress_mote_run
        mote_opts = {k: v for k, v in options.items() if k in ("steps", "num_experts", "lr") and v is not None}
        other = {k: v for k, v in options.items() if k not in ("steps", "num_experts", "lr") and v is not None
                 and k != "codec"}
        if other or out_dir is None:
            raise CompressionError(f"mote takes --steps and --out, not {', '.join(other) or 'an empty --out'}")
        return compress_mote_run(run_dir, out_dir, **mote_opts)
    if options.get("steps") is not None:
        raise CompressionError(f"--steps is for --method mote (QAT steps); {method} takes no training steps")
    options.pop("steps", None)
    cfg, model, state = load_run(run_dir, "cpu")
    if not find_moe_layers(model):
        raise CompressionError(f"{run_dir} has no MoE layers (ffn={cfg.model.ffn!r}, moe={cfg.model.moe is not None}); "
                               f"moekit compress needs a run of an MoE preset such as default or tiny")
    if num_tokens < 64:
        raise CompressionError(f"--calibration-tokens={num_tokens} is too few; give at least 64 (e.g. 4096)")
    data = load_data(cfg.data)
    report = compress(model, method, calibration_tokens(cfg, data, num_tokens), **options)
    if out_dir is not None:
        header = header_of(model, method, report.options, report.to_dict())
        save_compressed_run(out_dir, cfg, model, header,
                            {"step": state["step"], "compressed_from": str(Path(run_dir).resolve())})
    return report, model


def _eval(model, cfg, data, num_batches: int) -> dict:
    return evaluate(model, data, batch_size=cfg.train.batch_size, num_batches=num_batches, device="cpu")


def format_table(rows: list[dict]) -> str:
    header = ("| method | setting | baseline | expert MB (disk) | expert MB (resident) | memory | bits/param | "
              "val bits/byte | Δ vs float |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {'yes' if r['baseline'] else ''} | "
                     f"{r['disk_bytes'] / 1e6:.3f} | {r['resident_bytes'] / 1e6:.3f} | {r['memory_fraction']:.3f} | "
                     f"{r['bits_per_param']:.2f} | {r['val_bpb']:.4f} | {r['delta_bpb']:+.4f} |")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def sweep_run(run_dir: str | Path, out_dir: str | Path, *, points: list[tuple[str, dict]] | None = None,
              num_tokens: int = 4096, eval_batches: int | None = None, plot: bool = True) -> list[dict]:
    """Compress ``run_dir`` at every operating point, evaluate each, and write ``sweep.md``, ``sweep.json`` and
    ``sweep.png`` (bits/byte against expert bytes) into ``out_dir``."""
    cfg, model, _ = load_run(run_dir, "cpu")
    data = load_data(cfg.data)
    nb = eval_batches or cfg.train.eval_batches
    calib = calibration_tokens(cfg, data, num_tokens)
    float_bytes = expert_bytes(model)
    base = _eval(model, cfg, data, nb)["val_bpb"]
    rows = [{"method": "float", "setting": "fp32", "baseline": False, "disk_bytes": float_bytes,
             "resident_bytes": float_bytes, "memory_fraction": 1.0, "bits_per_param": 32.0, "val_bpb": base,
             "delta_bpb": 0.0}]
    for method, opts in points or SWEEP_POINTS:
        _, model, _ = load_run(run_dir, "cpu")
        report = compress(model, method, calib, **opts)
        bpb = _eval(model, cfg, data, nb)["val_bpb"]
        setting = ", ".join(f"{k}={v}" for k, v in opts.items())
        rows.append({"method": method, "setting": setting, "baseline": METHODS[method].baseline,
                     "disk_bytes": report.bytes_after, "resident_bytes": report.bytes_after,
                     "memory_fraction": report.memory_fraction, "bits_per_param": report.bits_per_param,
                     "val_bpb": bpb, "delta_bpb": bpb - base})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "sweep.md", format_table(rows) + "\n")
    _write_atomic(out / "sweep.json", json.dumps(rows, indent=2) + "\n")
    if plot:
        _plot(rows, out / "sweep.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        ax.plot([r["disk_bytes"] / 1e6 for r in pts], [r["val_bpb"] for r in pts], "o-" if len(pts) > 1 else "*",
                label=method)
    ax.set_xscale("log")
    ax.set_xlabel("expert bytes (MB, on disk = resident)")
    ax.set_ylabel("validation bits/byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
