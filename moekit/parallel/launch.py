"""Run a function on N local processes the way torchrun would, with a deadline (tests and benchmarks).

Each process gets torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``,
``MASTER_PORT`` a free port) and one intra-op thread, then calls ``fn(*args)``; ``fn`` typically starts with
:func:`moekit.parallel.init_from_env`. Return values come back in rank order. A process that raises stops
the others; a run past ``timeout`` is killed and raises :class:`TimeoutError` instead of hanging.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .groups import shutdown

__all__ = ["run_local", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, queue, args: tuple, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        result = fn(*args)
    except BaseException:
        if dist.is_initialized():  # no barrier: the peers may be stuck in a collective
            dist.destroy_process_group()
        raise
    shutdown()
    # Plain pickle copies tensors by value; the queue's own pickler would share their memory, which is gone
    # once this process exits.
    queue.put((rank, pickle.dumps(result)))
    # Skip the interpreter's teardown of torch (seconds per process on a busy machine); the result is
    # already written to the pipe and the process groups are destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              threads: int = 1, retries: int = 2) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes; return their results in rank order.

    Args:
        fn: a module-level (picklable) function.
        timeout: seconds for the whole run; then every process is killed.
        threads: ``torch.set_num_threads`` in each process.
        retries: new attempts with another port if the chosen one was taken meanwhile.
    """
    for attempt in range(retries + 1):
        queue = mp.get_context("spawn").SimpleQueue()
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), queue, args, threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while True:
                while not queue.empty():  # drain as we go: a full pipe would block a finishing child
                    rank, value = queue.get()
                    results[rank] = pickle.loads(value)
                if ctx.join(timeout=0.05):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} processes running {fn.__name__} passed {timeout:.0f} s; "
                                       f"a collective is probably waiting for a rank that skipped it")
        except mp.ProcessRaisedException as e:
            port_taken = "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
            if port_taken and attempt < retries:
                continue
            raise
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        while not queue.empty():
            rank, value = queue.get()
            results[rank] = pickle.loads(value)
        return [results[r] for r in range(world_size)]
    raise AssertionError("unreachable")
