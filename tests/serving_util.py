"""Small run folders for the serving tests: a random-weight model written as moekit train writes it."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.configs import to_dict
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.training import with_overrides
from moekit.training.checkpoint import CONFIG_FILE, write_checkpoint, write_json


def make_run(path: Path, seed: int = 0, **overrides) -> Path:
    """A run folder (config + weights at step 0) of a tiny byte-level MoE LM with sharp logits."""
    settings = {"model.dim": 32, "model.num_layers": 3, "model.num_heads": 2, "model.context": 48,
                "model.moe.hidden_dim": 24, "model.moe.num_experts": 6, "model.moe.top_k": 2}
    settings.update(overrides)
    cfg = with_overrides(load_preset("tiny"), settings)
    torch.manual_seed(seed)
    model = LanguageModel(cfg.model)
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are not near-ties
        model.embed.weight.mul_(10)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / CONFIG_FILE, to_dict(cfg))
    write_checkpoint(path, model.state_dict(), {}, {"step": 0})
    return path
