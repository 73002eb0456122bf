"""Asynchronous expert prefetch: loads run on one background thread; on CUDA the host→device copy goes on a side
stream (Mixtral-offloading / Pre-gated MoE overlap the next layer's expert copies with this layer's compute).

The cache's bookkeeping (which expert is resident, which one is evicted to make room) stays on the caller's
thread and happens when the prefetch is *issued*, exactly as for a synchronous prefetch; only the copy itself runs
in the background. A demand access to an expert still in flight waits for it. The weights are the same bytes
whichever thread copied them, so outputs are bit-identical to synchronous prefetch, and so are the hit and miss
counts (tests).

CUDA path (``device.type == "cuda"``): the background thread copies the expert from host memory (pinned first) with
``non_blocking=True`` on its own stream and records an event; the consumer makes its current stream wait on the
event and marks the tensors as used by that stream (``record_stream``), so the caching allocator does not reuse
their memory early. On the CPU there is no stream and no event: the same code minus those two steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["BackgroundLoader"]

Weights = dict[str, torch.Tensor]


class BackgroundLoader:
    """Runs ``load_host(key) -> {name: tensor on the host}`` on one worker thread and moves the result to ``device``.

    Args:
        load_host: reads one expert (e.g. out of the memory-mapped safetensors file).
        device: where the cache keeps experts.
    """

    def __init__(self, load_host: Callable[[Any], Weights], device: torch.device | str = "cpu") -> None:
        self.load_host = load_host
        self.device = torch.device(device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.worker_threads: set[int] = set()  # ids of the threads that ran loads (tests: not the caller's)

    def _work(self, key: Any) -> tuple[Weights, Any]:
        self.worker_threads.add(threading.get_ident())
        host = self.load_host(key)
        if self.stream is None:
            return {n: t.to(self.device) for n, t in host.items()}, None
        with torch.cuda.stream(self.stream):
            out = {n: t.pin_memory().to(self.device, non_blocking=True) for n, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def submit(self, key: Any) -> Future:
        """Start loading ``key``; :meth:`wait` on the returned future gives its weights."""
        return self._executor.submit(self._work, key)

    def wait(self, future: Future) -> Weights:
        """The weights of a submitted load, usable on the caller's current stream."""
        weights, event = future.result()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in weights.values():
                t.record_stream(current)
        return weights

    def close(self) -> None:
        self._executor.shutdown(wait=True)
