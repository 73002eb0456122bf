"""Timing helpers: candidates run alternately (A B A B ...) after a warm-up; medians are compared.

Absolute times are for reading; the figures that count are ratios measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["alternate", "saved_activation_bytes", "peak_memory"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
              device: torch.device | str | None = None, tick: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds (``tick()`` after each round,
    warm-up rounds included: ``warmup + repeats`` calls)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        if tick is not None:
            tick()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if tick is not None:
            tick()
    return {name: statistics.median(ts) for name, ts in times.items()}


def saved_activation_bytes(fn: Callable[[], torch.Tensor], module: torch.nn.Module | None = None) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()`` (a device-independent proxy for
    training memory on CPU, where the allocator keeps no peak statistics). Storages are counted once;
    ``module``'s parameters (which exist anyway) are not counted."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated on a CUDA device during ``fn()`` (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
