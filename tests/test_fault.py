"""Killing one rank mid-step: every other rank ends with a clear error within a bounded time, never a hang,
and the last complete checkpoint stays loadable.

4 processes (gloo) train the tiny preset with FSDP2 + EP (ep_size 2), a checkpoint every step and
``parallel.timeout_s=20``. Rank 1 kills itself (SIGKILL, no clean-up) while drawing its batch of step 3, so its
peers are inside the step's collectives. The processes are watched here rather than through ``run_local``
(which would kill the survivors as soon as one rank dies).
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from moekit.parallel import free_port
from moekit.recipes import load_preset
from moekit.training import load_run, train, with_overrides

WORLD, KILLED, KILL_STEP, TIMEOUT_S = 4, 1, 2, 20
BOUND_S = 60  # the survivors must have ended this long after the kill (timeout + start-up slack)


def _entry(rank: int, port: int, root: str, queue) -> None:
    import torch

    from moekit.parallel import init_from_env
    from moekit.training import step as step_module

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    init_from_env(1, timeout=timedelta(seconds=TIMEOUT_S))
    draw = step_module.train_batch

    def train_batch(data, batch_size, context, seed, step, index=0):
        if rank == KILLED and step == KILL_STEP:
            queue.put((rank, "killed", time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return draw(data, batch_size, context, seed, step, index)

    step_module.train_batch = train_batch  # what train_step draws its batches with
    cfg = with_overrides(load_preset("tiny"), {
        "train.max_steps": "6", "train.eval_every": "0", "train.checkpoint_every": "1",
        "parallel.ep_size": "2", "parallel.fsdp": "true", "parallel.timeout_s": str(TIMEOUT_S)})
    try:
        train(cfg, Path(root) / "run", progress=False)
        queue.put((rank, "finished", time.time()))
    except Exception as e:  # noqa: BLE001  (the error is what the test checks)
        queue.put((rank, f"{type(e).__name__}: {e}", time.time()))
    os._exit(0)


@pytest.mark.slow
def test_killing_one_rank_ends_the_others_with_a_clear_error(tmp_path):
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_entry, args=(free_port(), str(tmp_path), queue), nprocs=WORLD, join=False,
                             start_method="spawn")
    results: dict[int, tuple[str, float]] = {}
    deadline = time.monotonic() + 120 + BOUND_S
    try:
        while any(p.is_alive() for p in ctx.processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        hung = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    while not queue.empty():
        rank, what, when = queue.get()
        results[rank] = (what, when)
    assert not hung, f"ranks {hung} still running: a hang"
    assert results[KILLED][0] == "killed"
    killed_at = results[KILLED][1]
    for rank in set(range(WORLD)) - {KILLED}:
        what, when = results[rank]
        assert what.startswith("PeerFailure: "), (rank, what)
        assert "another process probably died" in what and "--resume" in what and len(what.splitlines()) == 1
        assert when - killed_at < BOUND_S, (rank, when - killed_at)
    # the last complete checkpoint (step KILL_STEP) loads in one process
    _, _, state = load_run(tmp_path / "run")
    assert state["step"] == KILL_STEP
