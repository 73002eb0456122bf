"""Multi-process training: data parallelism and expert parallelism inside :func:`moekit.training.train`.

Launch (one node, 4 processes, experts split over pairs of them)::

    torchrun --nproc_per_node=4 -m moekit train --preset default --parallel.ep_size=2

A run is distributed when torchrun started it (``WORLD_SIZE`` > 1 in the environment) or when
``parallel.ep_size > 1`` (which then insists on torchrun). Without either, nothing here touches
``torch.distributed`` and the single-process trainer runs exactly as before.

- **Layout** (:mod:`moekit.parallel`): consecutive groups of ``ep_size`` ranks share one copy of every MoE
  layer's experts, ``num_experts / ep_size`` each, and exchange tokens with the ``alltoall`` engine; everything
  else is replicated. ``ep_size=1`` is plain data parallelism. Every rank builds the model from
  ``train.seed`` (identical weights, then :func:`~moekit.parallel.broadcast_parameters` as a guard) and shards
  it before building its optimizer.
- **Data**: rank ``r``'s micro-batch ``m`` of step ``s`` is ``train_batch(seed, s, r * grad_accum + m)``.
  A step therefore sees ``world_size * grad_accum * batch_size`` sequences, and they are exactly the
  micro-batches of a single process with ``grad_accum = world_size * grad_accum``; gradients (and the
  routing losses, computed per micro-batch in both) are averaged the same way, so that single-process run
  has the same losses up to float rounding, whatever ``ep_size`` is.
- **Gradients**: :func:`~moekit.parallel.reduce_gradients` (world mean; experts over their replicas) and the
  whole model's norm clipped with :func:`~moekit.parallel.clip_grad_norm_`. The auxiliary-loss-free bias
  sums its counts over the world. A parameter without a gradient on every rank gets a zero one.
- **Logging**: rank 0 alone prints, writes ``metrics.jsonl`` (loss, CE and aux are world means; routing
  statistics and timings are rank 0's), the summary and the plots. MFU divides by ``world_size`` devices.
- **Validation** runs the same batches on every rank (an MoE forward under EP is a collective).
- **FSDP2** (``parallel.fsdp``): :func:`~moekit.parallel.apply_fsdp` after sharding the experts; gradient
  reduction skips the FSDP shards (already reduce-scattered) and the norm covers them.
- **Sharded checkpoints** (``parallel.checkpoint=sharded``): :func:`~moekit.parallel.save_sharded` /
  :func:`~moekit.parallel.load_sharded` (every rank its part; any layout loads them).
- **A failed peer**: a collective that fails (a rank died, or hung past ``parallel.timeout_s``) ends every
  surviving rank with a one-line :class:`PeerFailure`.
- **Checkpoints** (default ``full``) are the full, unsharded model in the single-process format (experts and their AdamW
  moments gathered over the EP group, rank 0 writes atomically): ``moekit eval`` / ``sample`` read them, and
  ``--resume`` loads them into any ``ep_size`` or world size (load the full state, keep the local experts).
  Every rank reads the run folder on resume, so multi-node runs need it on a shared filesystem. Resuming
  with another ``world_size * grad_accum`` changes the batches from there on.
- **Stopping**: the time budget and Ctrl-C / SIGTERM are agreed on by all ranks every step, so no rank stops
  alone, and so are non-finite steps (decided on the world-reduced loss and gradient norm).
- **Timeouts**: every process group (the default one and the expert-parallel ones) gets
  ``parallel.timeout_s``; a rank that dies or stops makes its peers fail after it with one line
  (:class:`CollectiveError`) instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import parallel
from ..configs import ConfigError
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    read_state,
    save_checkpoint,
    set_rng_states,
    weights_path,
    write_checkpoint,
)
from .config import RunConfig
from .evaluate import resolve_device

__all__ = ["CollectiveError", "Distributed", "PeerFailure", "explain_collective_error", "micro_index",
           "reduce_and_clip", "world_mean"]

# What gloo / NCCL say when a peer is gone or silent past the timeout.
_PEER_LOST = ("gloo", "nccl", "timed out", "timeout", "connection", "broken pipe", "peer", "socket", "closed")


class PeerFailure(ConfigError):
    """A collective failed: another process of the run died, was stopped or stayed silent past the timeout
    (one line; the CLI exits 2)."""


CollectiveError = PeerFailure  # the same error under the name the reliability tests and docs use


def explain_collective_error(error: BaseException, timeout_s: float, rank: int,
                             out_dir: Path | None = None) -> PeerFailure | None:
    """A one-line :class:`PeerFailure` for a lost or silent peer, or ``None`` for any other error."""
    text = str(error)
    is_dist_error = hasattr(dist, "DistError") and isinstance(error, dist.DistError)
    if not isinstance(error, RuntimeError) or not (is_dist_error or any(k in text.lower() for k in _PEER_LOST)):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    resume = (f"the last complete checkpoint in {out_dir} resumes with: torchrun ... -m moekit train --resume "
              f"--out {out_dir}" if out_dir is not None else "the last checkpoint is kept: resume with --resume")
    return PeerFailure(f"rank {rank}: a collective failed because another rank died, was stopped or did not "
                       f"answer within parallel.timeout_s={timeout_s:g} s ({first[:160]}); another process probably "
                       f"died or hung, or raise --parallel.timeout_s if a rank is only slow; {resume}")


def _world_size_from_env() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "RANK" not in os.environ:
        return 1
    return int(os.environ.get("WORLD_SIZE", "1"))


def _launch_hint(ep: int) -> str:
    return (f"torchrun --nproc_per_node={ep} -m moekit train ... --parallel.ep_size={ep} (a multiple of {ep} "
            f"processes in all; on several nodes add --nnodes, --node_rank and --rdzv_endpoint)")


class Distributed:
    """This process's part in a run: its :class:`~moekit.parallel.ParallelGroups` and the trainer's collectives.

    In a single process every method reduces to what the trainer did before (no ``torch.distributed``).
    """

    def __init__(self, groups: parallel.ParallelGroups, owns_process_group: bool = False, fsdp: bool = False,
                 param_dtype: torch.dtype | None = None, sharded: bool = False, node_size: int = 0) -> None:
        self.groups, self._owns = groups, owns_process_group
        self.node_size = node_size
        self.fsdp = fsdp and groups.is_distributed
        self.param_dtype = param_dtype
        self.sharded = sharded

    @classmethod
    def start(cls, cfg: RunConfig) -> "Distributed":
        """Check the launch against ``cfg.parallel`` and join the process group (collective under torchrun)."""
        ep, world = cfg.parallel.ep_size, _world_size_from_env()
        if ep > 1 and world == 1:
            raise ConfigError(f"parallel.ep_size={ep} needs {ep} processes sharing the experts; launch with "
                              f"{_launch_hint(ep)}, or set --parallel.ep_size=1")
        if world % ep:
            divisors = [d for d in range(1, world + 1) if world % d == 0]
            raise ConfigError(f"parallel.ep_size={ep} must divide the number of processes ({world}); choose "
                              f"one of {divisors}, or launch a multiple of {ep} processes")
        sharded = cfg.parallel.checkpoint == "sharded"
        if world == 1:
            return cls(parallel.ParallelGroups(), sharded=sharded)
        backend = "nccl" if resolve_device(cfg.train.device).type == "cuda" else "gloo"
        owns = not dist.is_initialized()
        try:
            groups = parallel.init_from_env(ep, backend=backend, timeout=timedelta(seconds=cfg.parallel.timeout_s))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        bf16 = cfg.train.dtype == "bfloat16" and parallel.bf16_supported(groups.device)
        return cls(groups, owns, fsdp=cfg.parallel.fsdp, param_dtype=torch.bfloat16 if bf16 else None,
                   sharded=sharded, node_size=cfg.parallel.hierarchical_node_size)

    @property
    def is_distributed(self) -> bool:
        return self.groups.is_distributed

    @property
    def is_main(self) -> bool:
        return self.groups.is_main

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    def device(self, requested: torch.device) -> torch.device:
        """Where this rank computes: ``cuda:LOCAL_RANK`` under NCCL, else the requested device."""
        return self.groups.device if self.is_distributed and requested.type == "cuda" else requested

    def describe(self) -> str:
        g = self.groups
        if not g.is_distributed:
            return ""
        experts = f", experts split over groups of {g.ep_size}" if g.ep_size > 1 else ""
        fsdp = ", FSDP2 shards the rest" if self.fsdp else ""
        return f"; {g.world_size} processes, data parallel{experts}{fsdp}"

    def close(self, ok: bool) -> None:
        """Leave the process group if :meth:`start` created it (with a barrier only after a clean run: after a
        failure a peer may be stuck in a collective)."""
        if not self._owns or not dist.is_initialized():
            return
        if ok:
            parallel.shutdown()
        else:
            dist.destroy_process_group()

    def explain_failure(self, error: BaseException, out_dir: Path, timeout_s: float) -> None:
        """Raise :class:`PeerFailure` in place of ``error`` when it is a failed collective of a distributed run
        (a peer died or hung past ``timeout_s``); return otherwise, for the caller to re-raise ``error``."""
        if not self.is_distributed:
            return
        explained = explain_collective_error(error, timeout_s, self.groups.rank, out_dir)
        if explained is not None:
            raise explained from None

    def on_main(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on rank 0 only; if it raises there, every rank raises (nobody waits for a dead peer)."""
        if not self.is_distributed:
            fn()
            return
        error: BaseException | None = None
        box: list = [None]
        if self.is_main:
            try:
                fn()
            except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
                error = e
                box = [(isinstance(e, ConfigError), f"{type(e).__name__}: {e}", str(e))]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            is_config, described, message = box[0]
            if is_config:
                raise ConfigError(message)
            raise RuntimeError(f"rank 0 failed: {described}")

    def agree(self, elapsed: float, stop: bool) -> tuple[float, bool]:
        """Rank 0's elapsed time (the schedule and the time budget follow it) and whether any rank wants to stop."""
        if not self.is_distributed:
            return elapsed, stop
        t = torch.tensor([elapsed if self.is_main else 0.0, float(stop)], dtype=torch.float64,
                         device=self.groups.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item(), bool(t[1].item())

    def shard(self, model: nn.Module) -> nn.Module:
        """Keep this rank's experts (before the optimizer is built) and make every copy start equal."""
        hierarchy = parallel.make_hierarchy(self.groups, self.node_size) if self.node_size else None
        parallel.shard_experts(model, self.groups, hierarchy=hierarchy)
        parallel.broadcast_parameters(model, self.groups)
        if self.fsdp:
            parallel.apply_fsdp(model, self.groups, self.param_dtype)
        return model

    def save(self, out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Write the full checkpoint (collective under expert parallelism; rank 0 writes), or the sharded one
        (``parallel.checkpoint=sharded``: every rank writes its part)."""
        if self.sharded:
            parallel.save_sharded(out_dir, model, optimizer, state, ep_size=self.groups.ep_size)
            return
        if self.groups.ep_size == 1 and not self.fsdp:
            self.on_main(lambda: save_checkpoint(out_dir, model, optimizer, state))
            return
        model_state = parallel.gather_full_state_dict(model)
        optimizer_state = _by_name(model, optimizer, parallel.gather_full_optimizer_state(model, optimizer))
        self.on_main(lambda: write_checkpoint(out_dir, model_state, optimizer_state, state))

    def load(self, out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Load a checkpoint (any layout wrote it) into this rank's model and optimizer, with RNG states: the
        sharded one when ``parallel.checkpoint=sharded`` or when the folder holds no full one, else the full one."""
        if parallel.has_sharded(out_dir) and (self.sharded or not _has_full(out_dir)):
            try:
                info = parallel.load_sharded(out_dir, model, optimizer, restore_rng=True)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            return {k: v for k, v in info.items() if k not in ("world_size", "ep_size")}
        if self.groups.ep_size == 1 and not self.fsdp:
            return load_checkpoint(out_dir, model, optimizer, restore_rng=True)
        state, model_state, optimizer_state, rng = read_checkpoint(out_dir)
        try:
            parallel.load_full_state_dict(model, model_state)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{weights_path(out_dir)} does not fit the model in config.json "
                                  f"({e})") from None
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        unknown = set(optimizer_state) - {names[id(p)] for p in params}
        if unknown:
            raise CheckpointError(f"optimizer state names unknown parameters {sorted(unknown)[:4]}; the "
                                  f"checkpoint does not belong to this model")
        full = optimizer.state_dict()
        full["state"] = {i: dict(optimizer_state[names[id(p)]]) for i, p in enumerate(params)
                         if names[id(p)] in optimizer_state}
        parallel.load_full_optimizer_state(model, optimizer, full)
        set_rng_states(rng)
        return state


def _has_full(out_dir: Path) -> bool:
    try:
        read_state(out_dir)
    except CheckpointError:
        return False
    return True


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict[str, dict]:
    """An ``optimizer.state_dict()``-style state (keyed by index) keyed by parameter name, in the same order."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {names[id(p)]: state_dict["state"][i] for i, p in enumerate(params) if i in state_dict["state"]}


def micro_index(groups: parallel.ParallelGroups | None, grad_accum: int, micro: int) -> int:
    """The batch index of this rank's micro-batch ``micro``: ranks take consecutive blocks of ``grad_accum``."""
    return (groups.rank if groups is not None else 0) * grad_accum + micro


def reduce_and_clip(model: nn.Module, max_norm: float, groups: parallel.ParallelGroups | None) -> torch.Tensor:
    """Average the gradients over the ranks and clip the whole model's norm; returns the norm before clipping."""
    if groups is None or not groups.is_distributed:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    parallel.reduce_gradients(model, groups)
    return parallel.clip_grad_norm_(model, max_norm, groups)


def world_mean(values: list[float], groups: parallel.ParallelGroups | None) -> list[float]:
    """Each value's mean over the ranks (one all-reduce); unchanged in a single process."""
    if groups is None or not groups.is_distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=groups.device)
    dist.all_reduce(t)
    return (t / groups.world_size).tolist()
