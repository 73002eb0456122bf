"""Between a run folder's sharded checkpoint (``torch.distributed.checkpoint``, :mod:`moekit.parallel.dcp`) and
its single-file checkpoint (:mod:`moekit.training.checkpoint`), in one process.

- :func:`export_full`: load the shards into the unsharded model and AdamW state (DCP reshards them to one
  process) and write the single-file checkpoint with :func:`~moekit.training.checkpoint.write_checkpoint`, so
  ``moekit eval`` / ``sample`` / ``compress`` and a ``parallel.checkpoint=full`` resume read it.
- :func:`import_full`: the reverse, for continuing a single-file run with ``parallel.checkpoint=sharded``.

Both keep the step, tokens and times, and the RNG state.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import parallel
from ..models import LanguageModel
from .checkpoint import CheckpointError, load_checkpoint, optimizer_state_by_name, write_checkpoint
from .optim import build_optimizer
from .runs import read_run_config

__all__ = ["export_full", "import_full"]


def _build(run_dir: Path) -> tuple[LanguageModel, torch.optim.Optimizer]:
    cfg = read_run_config(run_dir)
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)
    return model, build_optimizer(model, cfg.train)


def export_full(run_dir: str | Path) -> dict:
    """Write the single-file checkpoint of ``run_dir`` from its sharded one; returns the training state."""
    run_dir = Path(run_dir)
    if not parallel.has_sharded(run_dir):
        raise CheckpointError(f"{parallel.sharded_dir(run_dir)} holds no complete sharded checkpoint; train with "
                              f"--parallel.checkpoint=sharded first")
    model, optimizer = _build(run_dir)
    rng = torch.get_rng_state()
    try:
        try:
            info = parallel.load_sharded(run_dir, model, optimizer, restore_rng=True)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        state = {k: v for k, v in info.items() if k not in ("world_size", "ep_size")}
        write_checkpoint(run_dir, model.state_dict(), optimizer_state_by_name(model, optimizer), state)
    finally:
        torch.set_rng_state(rng)
    return state


def import_full(run_dir: str | Path) -> dict:
    """Write the sharded checkpoint of ``run_dir`` from its single-file one; returns the training state."""
    run_dir = Path(run_dir)
    model, optimizer = _build(run_dir)
    rng = torch.get_rng_state()
    try:
        state = load_checkpoint(run_dir, model, optimizer, restore_rng=True)
        parallel.save_sharded(run_dir, model, optimizer, state)
    finally:
        torch.set_rng_state(rng)
    return state
