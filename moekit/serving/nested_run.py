"""Bit-nested offloading of a compressed run folder: the ``d2moe-mwq`` expert planes stay in the run's safetensors
file (memory-mapped) and are read plane by plane on demand (:mod:`moekit.serving.nested` has the scheduler)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..models import LanguageModel
from ..training.checkpoint import CheckpointError, read_json, weights_path
from ..training.config import RunConfig
from ..training.runs import read_run_config
from .nested import _install, _nested_layers
from .offload import Offload, _load_resident

__all__ = ["load_offloaded_nested"]


class _File:
    """What :func:`~moekit.serving.offload._load_resident` reads: a safetensors file's keys, tensors, aliases."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be opened ({e}); re-run moekit compress") from None

    def keys(self) -> set[str]:
        return set(self._f.keys())

    def metadata(self) -> dict[str, str]:
        return self._f.metadata() or {}

    def tensor(self, name: str) -> torch.Tensor:
        return self._f.get_tensor(name)

    def reader(self, layer: str) -> Callable[[str], Any]:
        """``buffer name -> slice`` of one layer's packed expert tensors (memory-mapped, read on indexing)."""
        keys = self.keys()

        def read(buffer: str) -> Any:
            name = f"{layer}.experts.{buffer}"
            if name not in keys:
                raise CheckpointError(f"{self.path} has no tensor {name!r}; re-run moekit compress")
            return self._f.get_slice(name)
        return read


def load_offloaded_nested(run_dir: str | Path, expert_memory: str | int = "100%", *, miss_levels: int = 0,
                          max_levels: int | None = None, prefetch: str = "none", keep_bases: bool = True,
                          record: bool = True) -> tuple[RunConfig, LanguageModel, Offload]:
    """``(run config, model in eval mode, Offload)`` of a ``d2moe-mwq`` compressed run, its expert planes read
    from the run's memory-mapped safetensors file on demand (:func:`offload_nested` for the arguments)."""
    from ..compression.artifact import FORMAT, HEADER_FILE, apply_structure, is_compressed_run
    if not is_compressed_run(run_dir):
        raise ValueError(f"{run_dir} is not a compressed run (no {HEADER_FILE}); bit-nested offloading needs "
                         f"moekit compress RUN --method d2moe-mwq --out DIR")
    header = read_json(Path(run_dir) / HEADER_FILE)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{run_dir}/{HEADER_FILE} is not a moekit compression header; re-run moekit compress")
    cfg = read_run_config(run_dir)
    model = LanguageModel(cfg.model)
    apply_structure(model, header, str(Path(run_dir) / HEADER_FILE))
    names = {m: n for n, m in model.named_modules()}
    layers, banks = _nested_layers(model)
    file = _File(weights_path(run_dir))
    skip = {f"{names[m]}.experts." for m in layers}
    _load_resident(model, file, skip)  # type: ignore[arg-type]
    offload = _install(layers, banks, [file.reader(names[m]) for m in layers], expert_memory, miss_levels,
                       max_levels, prefetch, None, keep_bases, record)
    return cfg, model.eval(), offload
