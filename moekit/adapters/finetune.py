"""Fine-tuning a trained moekit run with adapters, through the ordinary trainer (``moekit finetune``).

The trainer builds the base run's model; its generic ``prepare_model`` hook loads the base checkpoint and injects
the adapters, which freezes everything else, so only adapter and router parameters reach the optimizer. The new
run folder is a normal one (config, metrics, summary, plots, checkpoint of the adapted model, resume) plus the
adapter file (:func:`moekit.training.checkpoint.adapters_path`), whose header lets ``load_run`` (hence
``moekit eval`` / ``moekit sample``) rebuild the adapted model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs import ConfigError
from ..models import LanguageModel
from ..training import train, with_overrides
from ..training.checkpoint import adapters_path, load_checkpoint, read_state
from ..training.runs import read_run_config
from ..training.trainer import TrainResult
from .api import Adapters, apply

__all__ = ["Companion", "FinetuneResult", "apply_all", "finetune"]

# A second method on other modules of the same model (e.g. LoRA on the attention beside MixLoRA on the FFNs, §15):
# (method, targets or None for the method's defaults, options).
Companion = tuple[str, list[str] | None, dict[str, Any]]


def base_config(base_run: Path, overrides: dict[str, Any]):
    """The base run's config with dotted ``train.*`` / ``data.*`` overrides (the model stays the base's)."""
    wrong = [k for k in overrides if not k.startswith(("train.", "data."))]
    if wrong:
        raise ConfigError(f"finetune keeps the base run's model; only train.* and data.* can be overridden, not "
                          f"{wrong}")
    return with_overrides(read_run_config(base_run), overrides)


def apply_all(model: nn.Module, method: str, targets: list[str] | None, options: dict[str, Any],
              companions: list[Companion] | None = None) -> Adapters:
    """Apply ``method`` and then every companion (each on modules the earlier ones left alone)."""
    handle = apply(model, method, targets, **options)
    for other, other_targets, other_options in companions or []:
        handle = apply(model, other, other_targets, **other_options)
    return handle


@dataclass
class FinetuneResult:
    """The training result and the adapters' facts (method, trainable parameters, adapter file)."""

    train: TrainResult
    method: str
    trainable_params: int
    adapter_file: Path


def finetune(base_run: str | Path, out_dir: str | Path, method: str, *, targets: list[str] | None = None,
             options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, resume: bool = False,
             progress: bool = True, companions: list[Companion] | None = None) -> FinetuneResult:
    """Train ``method`` adapters on the frozen model of ``base_run`` into ``out_dir``.

    Args:
        targets, options: as for :func:`moekit.adapters.apply`.
        companions: further ``(method, targets, options)`` applied after ``method`` on other modules.
        overrides: dotted ``train.*`` / ``data.*`` overrides of the base run's config (the model is the base's).
    """
    options = dict(options or {})
    overrides = dict(overrides or {})
    base_run, out_dir = Path(base_run), Path(out_dir)
    cfg = base_config(base_run, overrides)
    read_state(base_run)  # a base run without a complete checkpoint fails here, before anything is written
    with torch.device("meta"):  # every adapter check (method, options, targets, ranks) before anything is written
        probe = apply_all(LanguageModel(cfg.model), method, targets, options, companions)
    if probe.num_trainable() == 0:
        raise ConfigError(f"nothing to train: {method} with {options} on {probe.names} has no trainable parameter")
    if not resume and adapters_path(out_dir).exists():
        raise ConfigError(f"{out_dir} already holds a fine-tuning run; pass --resume or choose another --out")
    holder: dict[str, Adapters] = {}

    def prepare(model: nn.Module) -> None:
        load_checkpoint(base_run, model)
        handle = apply_all(model, method, targets, options, companions)
        holder["adapters"] = handle
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            handle.save(adapters_path(out_dir))

    result = train(cfg, out_dir, resume=resume, progress=progress, prepare_model=prepare)
    handle = holder["adapters"]
    handle.save(adapters_path(out_dir))
    return FinetuneResult(result, handle.method, handle.num_trainable(), adapters_path(out_dir))
