"""Opening a finished (or interrupted) run folder: its config and model, and evaluating it."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch

from ..configs import ConfigError
from ..data import load_data
from ..models import LanguageModel
from .checkpoint import CONFIG_FILE, CheckpointError, adapters_path, hf_base_path, load_checkpoint, read_json
from .config import RunConfig, run_config_from_dict
from .evaluate import evaluate, resolve_device

__all__ = ["load_run", "evaluate_run", "read_run_config"]


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist; give the --out folder of a "
                              f"moekit train run")
    try:
        return run_config_from_dict(read_json(run_dir / CONFIG_FILE))
    except CheckpointError:
        raise
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE} is not a valid run config ({e})") from None


def load_run(run_dir: str | Path, device: str = "auto", matmul: str | None = None
             ) -> tuple[RunConfig, LanguageModel, dict]:
    """``(config, model with the checkpoint's weights, in eval mode, training state)`` of a run folder.

    ``matmul`` (``dequantize`` / ``int8``) picks how a compressed run's experts multiply
    (:func:`moekit.compression.int8mm.set_matmul`); ``None`` leaves the default."""
    cfg = read_run_config(run_dir)
    if hf_base_path(run_dir).is_file():  # moekit finetune --hf: a transformers model behind the same interface
        from ..adapters.hf_finetune import model_from_record
        model = cast(LanguageModel, model_from_record(read_json(hf_base_path(run_dir)), cfg.model))
    else:
        model = LanguageModel(cfg.model)
    from ..compression.artifact import is_compressed_run, load_compressed_into
    if is_compressed_run(run_dir):  # written by moekit compress: experts stored merged / pruned / quantised
        state = load_compressed_into(Path(run_dir), model)
    else:
        if adapters_path(run_dir).is_file():  # a fine-tuning run: the checkpoint holds the adapted model
            from ..adapters import load as load_adapters
            load_adapters(model, adapters_path(run_dir), load_tensors=False)
        state = load_checkpoint(Path(run_dir), model)
    model = model.to(resolve_device(device)).eval()
    if matmul is not None:
        from ..compression.int8mm import set_matmul
        set_matmul(model, matmul)
    return cfg, model, state


@torch.no_grad()
def evaluate_run(run_dir: str | Path, num_batches: int | None = None, device: str = "auto",
                 matmul: str | None = None) -> dict:
    """Validation loss, bits per byte and routing statistics of a run's checkpoint (``matmul``: see load_run)."""
    cfg, model, state = load_run(run_dir, device, matmul)
    data = load_data(cfg.data)
    result = evaluate(model, data, batch_size=cfg.train.batch_size,
                      num_batches=num_batches or cfg.train.eval_batches, dtype=cfg.train.dtype,
                      device=next(model.parameters()).device)
    return {"step": state["step"], **result}
