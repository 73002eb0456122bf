"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes its own part, and a
checkpoint loads into any world size, ``ep_size`` or FSDP setting (resharding), or into one process.

Dim legend: E experts of a bank, L rows this rank holds of a bank parameter.

Layout-independent keys (what makes resharding work): DCP reshards a tensor whose *global* shape is the same
everywhere, but an expert-parallel bank holds ``[L, ...]`` rows of *some* experts (any placement, a MoETuner
plan included). So every :class:`~moekit.experts.ExpertBank` parameter is stored one expert at a time, under
``model/<name>/<e>``, as views into whatever this rank holds:

- an EP-sharded bank: its local experts (``ExpertShard.local_experts``); replicas write one copy;
- an FSDP2 ``DTensor`` bank (``fully_shard`` splits dimension 0, the experts): the experts of its local rows;
- a plain bank: every expert.

Every other parameter and buffer is stored whole under ``model/<name>`` (a ``DTensor`` as DCP's sharded
tensor, each rank writing its shard). AdamW's moments follow their parameter (``optim/<name>/<field>[/<e>]``),
its step count is ``optim/<name>/step``. Loading reads into the same views, in place, so a model and optimizer
built for any layout are filled without gathering anything. The RNG state is rank 0's (``rng/torch``).

On disk, ``<run>/sharded/`` holds DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per writing rank)
and ``moekit.json`` (the training state: step, tokens, elapsed time, and the world size and ``ep_size`` that
wrote it). A new checkpoint is written to a temporary folder beside it and renamed into place only after every
rank finished, so an interrupted save leaves the previous checkpoint whole.

:func:`export_full` turns a sharded checkpoint into the single-file run-folder checkpoint that ``moekit eval``
/ ``sample`` / ``compress`` read (through :func:`moekit.training.checkpoint.write_checkpoint`), and
:func:`import_full` the other way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor

from ..experts import ExpertBank

__all__ = ["SHARDED_DIR", "sharded_state", "init_optimizer_state", "save_sharded", "load_sharded",
           "read_sharded_info", "has_sharded", "sharded_dir"]

SHARDED_DIR = "sharded"
INFO_FILE = "moekit.json"


def sharded_dir(run_dir: str | Path) -> Path:
    """Where a run folder keeps its sharded checkpoint."""
    return Path(run_dir) / SHARDED_DIR


def has_sharded(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a complete sharded checkpoint."""
    folder = sharded_dir(run_dir)
    return (folder / INFO_FILE).is_file() and (folder / ".metadata").is_file()


def _rows(param: torch.Tensor, bank: ExpertBank) -> tuple[torch.Tensor, list[int]]:
    """This rank's rows of a bank parameter (a plain tensor, viewing the parameter) and their expert ids."""
    shard = getattr(bank, "expert_shard", None)
    if shard is not None:
        return param.data, list(shard.local_experts)
    if isinstance(param, DTensor):
        local = param.to_local()
        mesh = param.device_mesh
        if mesh.ndim != 1 or not param.placements[0].is_shard(0):
            raise ValueError(f"sharded checkpoints expect expert banks split on dimension 0 by FSDP over a 1-D "
                             f"mesh, not {param.placements} on a {mesh.ndim}-D mesh")
        E, W = param.shape[0], mesh.size()
        start = min(mesh.get_local_rank() * math.ceil(E / W), E)
        assert local.shape[0] == min(math.ceil(E / W), E - start), (local.shape, E, W)
        return local, list(range(start, start + local.shape[0]))
    return param.data, list(range(param.shape[0]))


def _bank_params(model: nn.Module) -> dict[str, tuple[nn.Parameter, ExpertBank]]:
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertBank):
            for name, p in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = (p, module)
    return out


def _split(prefix: str, value: torch.Tensor, param: torch.Tensor | None, bank: ExpertBank | None,
           out: dict[str, torch.Tensor]) -> None:
    """Put ``value`` (a parameter or a tensor of its shape) into ``out``, per expert when ``bank`` is given."""
    if bank is None or param is None or not torch.is_tensor(value) or value.shape != param.shape:
        out[prefix] = value
        return
    rows, experts = _rows(value, bank)
    for i, e in enumerate(experts):
        out[f"{prefix}/{e}"] = rows[i]


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """The DCP state of ``model`` (and ``optimizer``): views into this rank's tensors under layout-free keys."""
    banks = _bank_params(model)
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for name, value in model.state_dict().items():
        p, bank = banks.get(name, (None, None))
        _split(f"model/{name}", params.get(name, value), p, bank, out)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                _, bank = banks.get(name, (None, None))
                for field, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        _split(f"optim/{name}/{field}", value, p, bank, out)
    return out


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (zero moments, step 0) for parameters that have none, so DCP can load into it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when there is no process group; that is the intent here."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
                 *, ep_size: int = 1) -> Path:
    """Write a sharded checkpoint of ``model`` / ``optimizer`` / ``state`` into ``run_dir`` (collective: every
    rank calls it; each writes its own part). Returns the checkpoint folder."""
    final = sharded_dir(run_dir)
    tmp = final.with_name(f".{SHARDED_DIR}.tmp")
    rank = dist.get_rank() if _distributed() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if _distributed():
        dist.barrier()
    tensors = sharded_state(model, optimizer)
    tensors["rng/torch"] = torch.get_rng_state()
    with _quiet_single_process():
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not _distributed())
    if rank == 0:
        info = {**state, "world_size": dist.get_world_size() if _distributed() else 1, "ep_size": ep_size}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        old = final.with_name(f".{SHARDED_DIR}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if _distributed():
        dist.barrier()  # nobody returns (and possibly reads) before the rename
    return final


def read_sharded_info(run_dir: str | Path) -> dict:
    """The training state stored with a sharded checkpoint (``step``, ``world_size``, ``ep_size``, ...)."""
    path = sharded_dir(run_dir) / INFO_FILE
    if not path.is_file() or not (path.parent / ".metadata").is_file():
        raise FileNotFoundError(f"{path.parent} holds no complete sharded checkpoint; train with "
                                f"--parallel.checkpoint=sharded, or import a full one (moekit checkpoint import)")
    return json.loads(path.read_text())


@torch.no_grad()
def load_sharded(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 restore_rng: bool = False) -> dict:
    """Load a sharded checkpoint, written under any layout, into ``model`` (and ``optimizer``) as built here,
    in place (collective when distributed). Returns the training state.

    Raises:
        FileNotFoundError: no complete sharded checkpoint in ``run_dir``.
        ValueError: the checkpoint's tensors do not fit ``model`` / ``optimizer``.
    """
    info = read_sharded_info(run_dir)
    if optimizer is not None:
        init_optimizer_state(optimizer)
    tensors = sharded_state(model, optimizer)
    if restore_rng:
        tensors["rng/torch"] = torch.get_rng_state()
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=str(sharded_dir(run_dir)), no_dist=not _distributed())
    except (dcp.CheckpointException, RuntimeError, KeyError) as e:
        raise ValueError(f"the sharded checkpoint in {sharded_dir(run_dir)} does not fit this model "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); resume with the run's own "
                         f"model settings") from None
    if restore_rng:
        torch.set_rng_state(tensors["rng/torch"])
    return info
