"""The run configuration tree: ``RunConfig{model, data, train, parallel}``.

A preset TOML file maps onto :class:`RunConfig` through :func:`run_config_from_dict`; command-line
``--a.b=c`` overrides go through :func:`with_overrides`. Both fill ``model.moe.dim`` from ``model.dim`` when
it is not given, so a preset or an override states the model width once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..configs import ConfigError, apply_overrides, check, check_choice, check_types, from_dict
from ..data import DataConfig
from ..models import ModelConfig

# Feed-forward kinds whose experts expert parallelism can split (moekit.parallel.shard_experts): plain MoE
# (with shared and fine-grained experts), top-p (an inner MoE), Chain-of-Experts and MoE++ (one bank each).
# The others keep an expert layout of their own (per-layer banks of other shapes, graph or recurrent routing
# across layers, depth routing) and are refused with this list in the message.
EXPERT_PARALLEL_FFNS = ("moe", "topp", "coe", "moepp")

__all__ = ["ParallelConfig", "RunConfig", "TrainConfig", "run_config_from_dict", "with_overrides"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Optimisation and bookkeeping of a run.

    Attributes:
        seed: seeds the initial weights and the order of training batches (a run is reproducible from it).
        batch_size: sequences per micro-batch; tokens per step are ``batch_size * grad_accum * context``, times
            the number of processes under torchrun (each trains on its own micro-batches).
        grad_accum: micro-batches whose gradients add up before each optimizer step.
        max_steps: optimizer steps; the cosine schedule spans them. The presets budget in steps, so a run
            trains the same model on any machine, busy or idle; only its duration differs.
        max_seconds: optional wall-time budget (training and validation, not start-up). The run stops at
            whichever of ``max_steps`` and ``max_seconds`` comes first, and the schedule follows the one that
            is further along. Runs with a time budget are not bit-reproducible (how far they get depends on
            the machine's load). ``time_clock`` says which clock it counts.
        time_clock: the clock of ``max_seconds``. ``wall``: wall time of training and validation (rank 0's
            ``time.perf_counter``), so other jobs on a shared machine slow the run and shorten what it trains.
            ``cpu``: this process's CPU seconds (``time.process_time``) spent in *training steps only*
            (validation, checkpoints and start-up are not counted: evaluations are equal in number across the
            arms of a study but not in cost, and an equal-time comparison is of training). With one torch
            thread (``train.threads=1``) that is the steps' own duration whatever else the machine runs; with
            N threads it is the sum over them (about N times the wall time on an idle machine). Under torchrun
            rank 0's count decides for every rank. The schedule follows the same clock.
        expected_tokens_per_s: training tokens/s this config reaches on the reference machine (2 idle CPU
            cores, float32), or ``None``. Gives the duration estimate printed before the first step, and a
            warning when the measured rate is below a third of it (a busy or slower machine: the run then
            takes longer, and under a time budget it would train less).
        lr: peak learning rate of AdamW.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        warmup_steps: linear warm-up from ``lr / warmup_steps``.
        weight_decay: decoupled weight decay of matrices (norm gains are not decayed).
        beta1, beta2: AdamW moment coefficients.
        grad_clip: clip the global gradient norm to this (0 disables).
        dtype: ``float32`` or ``bfloat16`` autocast (weights and optimizer state stay float32).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        threads: CPU threads for the run (``torch.set_num_threads``); ``None`` keeps torch's default. Tiny
            models run faster on one thread, whose small matmuls gain nothing from splitting.
        eval_every: validate every this many steps (0: only at the end).
        eval_batches: validation batches per evaluation.
        log_every: record routing statistics (load balance) and refresh the progress line this often.
        checkpoint_every: write a checkpoint every this many steps (0: no step-based checkpoints).
        checkpoint_seconds: also write one when this much wall time (rank 0's clock) has passed since the
            last (0 or ``None``: none by time). A run always checkpoints at its end and when stopped by
            Ctrl-C / SIGTERM. Each checkpoint replaces the previous one atomically (see
            :mod:`moekit.training.checkpoint`).
        on_nonfinite: what a NaN/inf loss or gradient norm does: ``stop`` (the run ends with an error and
            saves nothing; the last checkpoint is kept) or ``skip`` (the step's update is dropped and
            training goes on; 10 such steps in a row stop the run).
        fused_optimizer: use torch's fused AdamW kernel where the parameters allow it (plain CPU/CUDA
            tensors; not FSDP's); ``False`` keeps the single-tensor loop. Both agree to float32 rounding; the
            fused one is several times faster, which matters most for a MoE (its cost follows the total
            parameters, not the active ones). See :func:`moekit.training.optim.build_optimizer`.
    """

    seed: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    max_seconds: float | None = None
    time_clock: Literal["wall", "cpu"] = "wall"
    expected_tokens_per_s: float | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"
    threads: int | None = None
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 500
    checkpoint_seconds: float | None = 600.0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    fused_optimizer: bool = True

    def __post_init__(self) -> None:
        check_types(self, "train")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "max_seconds",
                     "checkpoint_seconds"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                    and math.isfinite(value)),
                  f"train.{name}={value!r} must be a finite number")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"train.{name}={value!r} must be a positive integer")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            check(value >= 0, f"train.{name}={value} must be >= 0 (0 disables it)")
        check(self.threads is None or self.threads >= 1,
              f"train.threads={self.threads} must be positive, or none for torch's default")
        check(self.max_seconds is None or self.max_seconds > 0,
              f"train.max_seconds={self.max_seconds} must be positive, or none for no time budget")
        check(self.expected_tokens_per_s is None or self.expected_tokens_per_s > 0,
              f"train.expected_tokens_per_s={self.expected_tokens_per_s} must be positive, or none for no "
              f"estimate")
        check(self.lr > 0, f"train.lr={self.lr} must be positive (e.g. 3e-3)")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
              f"train.beta1={self.beta1}, train.beta2={self.beta2} must be in [0, 1) (e.g. 0.9 and 0.95)")
        check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        check(self.checkpoint_seconds is None or self.checkpoint_seconds >= 0,
              f"train.checkpoint_seconds={self.checkpoint_seconds} must be >= 0 (0 or none: no checkpoints by time)")
        check_choice("train", "time_clock", self.time_clock, ("wall", "cpu"))
        check_choice("train", "on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        check_choice("train", "dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("train", "device", self.device, ("auto", "cpu", "cuda"))


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """How a run is spread over processes (launched with ``torchrun``; see :mod:`moekit.training.distributed`).

    The number of processes is torchrun's (``--nnodes * --nproc_per_node``), not a config field. Every process
    trains on its own micro-batches, so a step sees ``world_size * grad_accum * batch_size`` sequences.

    Attributes:
        ep_size: expert-parallel group size: that many consecutive processes share one copy of each MoE layer's
            experts (``num_experts / ep_size`` each); it must divide the number of processes and
            ``model.moe.num_experts``. 1: plain data parallelism (every process holds the whole model).
        fsdp: shard every non-expert parameter, its gradient and its AdamW moments over all processes with
            PyTorch's FSDP2 (``fully_shard``), on a 2-D ``(dp, ep)`` device mesh with the experts split by
            ``ep_size`` (:mod:`moekit.parallel.fsdp`); bfloat16 compute when ``train.dtype=bfloat16``. No effect
            in a single process.
        checkpoint: ``full`` writes the unsharded single-file checkpoint (gathered; rank 0 writes); ``sharded``
            writes ``torch.distributed.checkpoint`` shards into ``<out>/sharded`` (every rank its own part,
            nothing gathered) that resume under any number of processes, ``ep_size`` or ``fsdp``; turn them
            into the single-file checkpoint that ``eval`` / ``sample`` read with ``moekit checkpoint export``.
        timeout_s: seconds a collective of the run's process groups (the world, the expert-parallel and
            replica groups, the mesh) waits for a peer before raising. A rank that dies usually ends its peers at
            once (gloo and NCCL see the closed connection); this bounds the rest (a rank that hangs). Raise it
            for very slow steps or checkpoints.
        hierarchical_node_size: 0 exchanges tokens with one flat all-to-all; ``G > 0`` uses DeepSpeed-MoE's
            hierarchical all-to-all with ``G`` ranks of each expert-parallel group per node (intra-node hop,
            then one inter-node message per node); it must divide ``ep_size``. Same results either way.
    """

    ep_size: int = 1
    fsdp: bool = False
    checkpoint: Literal["full", "sharded"] = "full"
    timeout_s: float = 300.0
    hierarchical_node_size: int = 0

    def __post_init__(self) -> None:
        check_types(self, "parallel")
        check(math.isfinite(self.timeout_s) and self.timeout_s > 0,
              f"parallel.timeout_s={self.timeout_s!r} must be a positive number of seconds (default 300)")
        check(isinstance(self.ep_size, int) and self.ep_size >= 1,
              f"parallel.ep_size={self.ep_size!r} must be a positive integer (1: no expert parallelism)")
        check(isinstance(self.fsdp, bool), f"parallel.fsdp={self.fsdp!r} must be true or false")
        check_choice("parallel", "checkpoint", self.checkpoint, ("full", "sharded"))
        check(isinstance(self.hierarchical_node_size, int) and self.hierarchical_node_size >= 0
              and (self.hierarchical_node_size == 0 or self.ep_size % self.hierarchical_node_size == 0),
              f"parallel.hierarchical_node_size={self.hierarchical_node_size!r} must be 0 (flat all-to-all) or "
              f"divide parallel.ep_size={self.ep_size} (the expert-parallel processes per node)")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything a run needs; written as ``config.json`` into the run folder.

    Attributes:
        name: the preset (or a label of your own).
        description: one line on what the run is for (presets list it).
        model: the network: sizes, attention, and which layers are MoE (ModelConfig).
        data: the corpus, its tokenizer and its train/validation split (DataConfig).
        train: optimisation, budgets and bookkeeping (TrainConfig).
        parallel: how the run spreads over torchrun processes (ParallelConfig).
    """

    name: str = "custom"
    description: str = ""
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check_types(self, "run")
        # The name becomes a folder name (runs/<name>-<time>): it must not leave the runs folder.
        check(isinstance(self.name, str) and self.name not in ("", ".", "..") and "/" not in self.name
              and "\\" not in self.name and "\0" not in self.name,
              f"name={self.name!r} must be a plain label without path separators (e.g. 'my-run'); use --out DIR "
              f"to choose the run folder")
        if self.data.tokenizer == "bytes":
            check(self.model.vocab_size >= 256,
                  f"model.vocab_size={self.model.vocab_size} is too small for byte-level data (256 values); "
                  f"set model.vocab_size=256")
        ep = self.parallel.ep_size
        if ep > 1:
            check(self.model.moe is not None and self.model.moe.num_experts % ep == 0,
                  f"parallel.ep_size={ep} must divide model.moe.num_experts "
                  f"({None if self.model.moe is None else self.model.moe.num_experts})")
            check(self.model.ffn in EXPERT_PARALLEL_FFNS,
                  f"parallel.ep_size={ep} shards MoE layers that route over one expert bank (model.ffn one of "
                  f"{list(EXPERT_PARALLEL_FFNS)}), not the {self.model.ffn!r} variant; train it with "
                  f"--parallel.ep_size=1 (data parallel over the torchrun processes, with --parallel.fsdp=true "
                  f"to shard it)")
        if self.model.moe is not None:
            check(self.model.moe.engine != "alltoall",
                  "model.moe.engine='alltoall' is set by expert parallelism itself; choose the engine each rank "
                  "runs on its experts (auto, sorted, reference, grouped_mm) and set --parallel.ep_size")


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a nested dict (a parsed preset); ``model.moe.dim`` defaults to ``model.dim``."""
    model = data.get("model")
    if not isinstance(model, dict):
        raise ConfigError("the config has no [model] table; start from a preset (moekit presets) or add one")
    moe = model.get("moe")
    if isinstance(moe, dict) and "dim" not in moe and "dim" in model:
        data = {**data, "model": {**model, "moe": {**moe, "dim": model["dim"]}}}
    return from_dict(RunConfig, data)


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """``cfg`` with dotted overrides applied (``{"model.moe.top_k": "4"}``); ``model.moe.dim`` follows ``model.dim``."""
    overrides = dict(overrides)
    touches_moe = any(k.startswith("model.moe.") for k in overrides)
    if "model.moe" not in overrides and "model.moe.dim" not in overrides and (cfg.model.moe is not None or touches_moe):
        overrides["model.moe.dim"] = overrides.get("model.dim", cfg.model.dim)
    return apply_overrides(cfg, overrides)
