"""Timing helpers: candidates run alternately (A B A B ...) after a warm-up; medians are compared.

Absolute times are for reading; the figures that count are ratios measured in the same run.

Clocks: ``wall`` (``time.perf_counter``, the default) or ``cpu`` (``time.process_time``: CPU seconds of this
process, all its threads together). On a machine shared with other CPU-heavy processes the wall clock also
counts the time this process waited for a core, which changes from one call to the next; the CPU clock does
not (issue 20: with 3-5 runnable processes on 2 cores, wall-clock medians of the same layer moved by up to 50%
between runs while CPU-time medians moved by ~1%). With one torch thread the CPU time is the time the work
takes; with several it is their sum, i.e. it does not show a parallel speed-up. CUDA work needs ``wall``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["CLOCKS", "alternate", "alternate_rounds", "paired_ratios", "saved_activation_bytes", "peak_memory",
           "run_environment"]

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
              device: torch.device | str | None = None, tick: Callable[[], None] | None = None,
              clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds (``tick()`` after each round,
    warm-up rounds included: ``warmup + repeats`` calls) on ``clock`` (``wall`` or ``cpu``, module doc)."""
    rounds = alternate_rounds(fns, repeats=repeats, warmup=warmup, device=device, tick=tick, clock=clock)
    return {name: statistics.median(ts) for name, ts in rounds.items()}


def paired_ratios(rounds: dict[str, list[float]], base: str) -> dict[str, tuple[float, float, float]]:
    """Per round, each function's value (seconds, or a rate) divided by ``base``'s in the same round; their
    quartiles ``(q1, median, q3)`` per function. Pairing by round cancels what slows a whole round (another process on the
    machine), so the quartiles show how far a ratio moves within one run: a difference between two candidates
    inside that range is noise. (The median of these ratios can differ from the ratio of the medians.)"""
    out = {}
    for name, ts in rounds.items():
        ratios = [t / b for t, b in zip(ts, rounds[base])]
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[name] = (q1, median, q3)
    return out


def alternate_rounds(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
                     device: torch.device | str | None = None, tick: Callable[[], None] | None = None,
                     clock: str = "wall") -> dict[str, list[float]]:
    """The seconds of every timed call of each function, in round order (as :func:`alternate`, whose medians
    are taken from these)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"clock='cpu' measures host CPU time and cannot time work on {device}; use clock='wall'")
    now = CLOCKS[clock]
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
            t0 = now()
            fn()
            _sync(device)
            times[name].append(now() - t0)
        if tick is not None:
            tick()
    return times


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


CPUINFO = "/proc/cpuinfo"  # read for the CPU's model name (a module constant so that tests can point it elsewhere)


def _cpu_name() -> str:
    """The CPU's model name: the first ``model name`` line of :data:`CPUINFO` where that file is readable (Linux
    on x86), else ``platform.processor()``, else ``platform.machine()``; never raises."""
    import platform

    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() == "model name" and value.strip():
                    return " ".join(value.split())
    except (OSError, ValueError):
        pass
    try:
        return platform.processor() or platform.machine() or "unknown CPU"
    except Exception:  # platform.processor() may run `uname -p`
        return "unknown CPU"


def _device_fields(device: torch.device | str | None) -> dict:
    """``device``: a readable name of the device a benchmark ran on (the GPU's name for CUDA, the CPU model for
    CPU); ``cuda``: the CUDA version torch was built with, for CUDA devices only."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError, ValueError):
        return {"device": str(device)}
    if dev.type == "cpu":
        return {"device": _cpu_name()}
    if dev.type == "cuda":
        try:
            name = torch.cuda.get_device_name(dev)
        except Exception as e:  # no CUDA device or driver: record what was asked for and why no name came
            name = f"{dev} (name unavailable: {type(e).__name__})"
        return {"device": name, "cuda": torch.version.cuda}
    return {"device": str(dev)}


def run_environment(device: torch.device | str | None = "cpu") -> dict:
    """What a benchmark JSON records about the run: date (UTC), torch version, the device (:func:`_device_fields`),
    CPU threads, load average. Cheap (no subprocess where ``/proc/cpuinfo`` is readable) and never raises."""
    import datetime
    import os
    import platform

    try:
        load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    except OSError:
        load = None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, **_device_fields(device), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": load}
