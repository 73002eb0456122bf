"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, validation, checkpoints, summary.

Dim legend: B batch, S sequence, V vocabulary.

One optimizer step::

    for each micro-batch m:   loss_m = CE(model(x_m)) + routing losses in ctx;  (loss_m / grad_accum).backward()
    clip the gradient norm; optimizer.step(); update_expert_biases(model); module.on_step(step) for hooks

Determinism: weights come from ``torch.manual_seed(train.seed)``; batch ``(step, m)`` is a pure function of
``(seed, step, m)``; a checkpoint holds the weights, the AdamW moments and the RNG state, so a resumed run
takes exactly the steps an uninterrupted one takes (for step budgets; a time budget depends on the clock).

Under torchrun the same loop runs on every process, data- and expert-parallel: see
:mod:`moekit.training.distributed` (each rank's micro-batches, gradient reduction, rank-0 logging, full
checkpoints that load into any layout).
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigError, to_dict
from ..data import TokenData, load_data, train_batch
from ..layers.variants.thor import THOR, add_consistency_loss
from ..models import LanguageModel, count
from ..parallel import ParallelGroups, has_sharded
from ..routing import update_expert_biases
from ..types import RoutingContext
from .checkpoint import CONFIG_FILE, STATE_FILE, CheckpointError, read_json, write_json
from .config import RunConfig
from .distributed import Distributed, micro_index, reduce_and_clip, world_mean
from .evaluate import autocast, evaluate, resolve_device
from .metrics import MetricsLog, Progress, measure_matmul_peak, read_metrics, summary_table
from .optim import build_optimizer, learning_rate
from .plots import plot_run

__all__ = ["train", "TrainResult", "train_step", "call_on_step"]


@dataclass
class TrainResult:
    """What :func:`train` leaves: the run folder, the final summary and every metrics record."""

    out_dir: Path
    summary: dict
    records: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Training loss of every step, in step order."""
        return [r["loss"] for r in self.records if "loss" in r]


def call_on_step(model: nn.Module, step: int) -> None:
    """The train-step hook: ``module.on_step(step)`` for every module that has one (``step`` steps are done)."""
    for module in model.modules():
        if callable(getattr(module, "on_step", None)):
            module.on_step(step)


def consistency_coef(model: nn.Module) -> float | None:
    """The coefficient of THOR's two-pass consistency loss when the model has stochastic-expert layers."""
    coefs = [m.consistency_coef for m in model.modules() if isinstance(m, THOR)]
    return max(coefs) if coefs else None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: TokenData, cfg: RunConfig, step: int,
               device: torch.device, collect_stats: bool = False, groups: ParallelGroups | None = None) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics.

    With distributed ``groups`` (every rank calls it): this rank's micro-batches, gradients averaged over the
    ranks, the whole model's norm clipped, and loss, CE and aux averaged over the ranks; routing statistics
    stay this rank's.
    """
    tc = cfg.train
    two_pass_coef = consistency_coef(model)
    ce_sum, aux_sum, stats = 0.0, 0.0, {}
    for micro in range(tc.grad_accum):
        x_BS, y_BS = train_batch(data, tc.batch_size, cfg.model.context, tc.seed, step,
                                 micro_index(groups, tc.grad_accum, micro))
        x_BS, y_BS = x_BS.to(device), y_BS.to(device)
        with autocast(device, tc.dtype):
            logits_BSV, ctx = model(x_BS, RoutingContext(collect_stats=collect_stats))
        ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.flatten())
        aux = ctx.total_loss()
        loss = ce + aux
        if two_pass_coef is not None:  # THOR: a second stochastic pass and the consistency loss
            with autocast(device, tc.dtype):
                logits2_BSV, ctx2 = model(x_BS, RoutingContext(collect_stats=False))
            ce2 = F.cross_entropy(logits2_BSV.float().flatten(0, 1), y_BS.flatten())
            # The paper sums CE and the symmetric KL over tokens; with mean CE, the KL is a mean over tokens too.
            consistency = add_consistency_loss(ctx, logits_BSV, logits2_BSV, two_pass_coef / y_BS.numel())
            loss = ce + ce2 + ctx2.total_loss() + aux + consistency
            aux = aux + consistency
            ce = (ce + ce2) / 2
        (loss / tc.grad_accum).backward()
        ce_sum += ce.item()
        aux_sum += float(aux.detach()) if isinstance(aux, torch.Tensor) else float(aux)
        stats.update(ctx.stats_summary())
    grad_norm = reduce_and_clip(model, tc.grad_clip if tc.grad_clip > 0 else float("inf"), groups)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_expert_biases(model)
    call_on_step(model, step + 1)
    ce, aux = world_mean([ce_sum / tc.grad_accum, aux_sum / tc.grad_accum], groups)
    out = {"loss": ce + aux, "ce": ce, "aux": aux, "grad_norm": float(grad_norm)}
    if stats:
        out["load_cv"] = sum(s["load_cv"] for s in stats.values()) / len(stats)
        out["dead_experts"] = sum(s["dead_experts"] for s in stats.values())
    return out


class _NoLog:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _StopFlag:
    """Ctrl-C asks the loop to stop after the current step (and checkpoint); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested, self._previous = False, None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _prepare_dir(cfg: RunConfig, out_dir: Path, resume: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        saved = read_json(out_dir / CONFIG_FILE)
        if saved.get("model") != to_dict(cfg.model):
            raise CheckpointError(f"the model in {out_dir / CONFIG_FILE} differs from the one asked for; resume "
                                  f"with the run's own model settings (only train.*, data.* and parallel.* may change)")
    elif (out_dir / STATE_FILE).exists() or has_sharded(out_dir):
        raise CheckpointError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    write_json(out_dir / CONFIG_FILE, to_dict(cfg))


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, until_step: int | None = None,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` into ``out_dir`` (or continue the checkpoint there with ``resume=True``).

    Args:
        until_step: stop after this step with a checkpoint, as if interrupted (the schedule still spans
            ``train.max_steps``); the final validation, summary and plots are then left for the resume.
        progress: show a progress bar / progress lines on stderr and the summary table on stdout.

    Under torchrun (or with ``cfg.parallel.ep_size > 1``, which needs it) every process calls this; rank 0
    writes the folder and prints, and the other ranks' results carry no metrics records.

    Returns:
        The run folder, the summary (validation loss and bits per byte, tokens/s, MFU, wall time, per-layer
        load statistics) and every metrics record.
    """
    out_dir = Path(out_dir)
    par = Distributed.start(cfg)  # a single process unless torchrun launched this one
    ok = False
    try:
        par.on_main(lambda: _prepare_dir(cfg, out_dir, resume))
        threads = torch.get_num_threads()
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        try:
            result = _Run(cfg, out_dir, resume, progress, par).loop(until_step)
        except RuntimeError as e:  # a peer died or hung: say so in one line, on every surviving rank
            par.explain_failure(e, out_dir, cfg.parallel.timeout_s)
            raise
        finally:
            torch.set_num_threads(threads)
        ok = True
        return result
    finally:
        par.close(ok)


class _Run:
    """The state of one training invocation: model, optimizer, data, bookkeeping."""

    def __init__(self, cfg: RunConfig, out_dir: Path, resume: bool, progress: bool, par: Distributed) -> None:
        tc = cfg.train
        self.cfg, self.out_dir, self.par = cfg, out_dir, par
        self.show = progress and par.is_main
        self.device = par.device(resolve_device(tc.device))
        torch.manual_seed(tc.seed)  # the same on every rank: identical full weights before sharding
        self.model = LanguageModel(cfg.model).to(self.device)
        self.counts = count(self.model)  # of the whole model, before sharding
        par.shard(self.model)
        self.optimizer = build_optimizer(self.model, tc)
        self.data = load_data(cfg.data)
        if self.data.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer {cfg.data.tokenizer!r} has {self.data.tokenizer.vocab_size} tokens "
                              f"but model.vocab_size={cfg.model.vocab_size}; set "
                              f"--model.vocab_size={self.data.tokenizer.vocab_size}")
        self.peak = measure_matmul_peak(self.device)
        self.state = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_time": 0.0}
        if resume:
            self.state = par.load(out_dir, self.model, self.optimizer)
            call_on_step(self.model, self.state["step"])  # hooks that keep state re-derive it from the step
        self.log = (MetricsLog(out_dir / "metrics.jsonl", resume_step=self.state["step"] if resume else None)
                    if par.is_main else _NoLog())
        self.bar = Progress(tc.max_steps, self.state["step"], enabled=self.show)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.context * par.world_size
        self.val, self.load_cv = None, None
        c = self.counts
        self.bar.write(f"{cfg.name}: {c.total_params:,} params ({c.active_params:,} active), "
                       f"{c.flops_per_token / 1e6:.1f} MFLOP/token; data: {self.data.description}; "
                       f"matmul peak {self.peak / 1e9:.0f} GFLOP/s; run folder {out_dir}{par.describe()}")

    def loop(self, until_step: int | None) -> TrainResult:
        tc, state = self.cfg.train, self.state
        stop_at = min(tc.max_steps, until_step) if until_step is not None else tc.max_steps
        self.start = time.perf_counter() - state["elapsed"]
        try:
            with _StopFlag() as stop:
                while state["step"] < stop_at:
                    # Every rank takes the same decision, on rank 0's clock (the schedule follows it too).
                    elapsed, stopped = self.par.agree(time.perf_counter() - self.start, stop.requested)
                    if stopped or (tc.max_seconds is not None and elapsed >= tc.max_seconds):
                        break
                    self._step(elapsed)
                self.par.save(self.out_dir, self.model, self.optimizer, state)
                _, stopped = self.par.agree(0.0, stop.requested)
                if stopped or (until_step is not None and state["step"] < tc.max_steps):
                    launch = "moekit" if not self.par.is_distributed else "torchrun ... -m moekit"
                    self.bar.write(f"stopped at step {state['step']}; continue with: "
                                   f"{launch} train --resume --out {self.out_dir}")
                    return TrainResult(self.out_dir, dict(state), self._records())
                if self.val is None or self.val["step"] != state["step"]:
                    self._validate()
        finally:
            self.bar.close()
            self.log.close()
        return self._finish()

    def _step(self, elapsed: float) -> None:
        tc, state, step = self.cfg.train, self.state, self.state["step"]
        lr = learning_rate(tc, step, max(step / tc.max_steps, elapsed / tc.max_seconds if tc.max_seconds else 0.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        rec = train_step(self.model, self.optimizer, self.data, self.cfg, step, self.device,
                         collect_stats=step % tc.log_every == 0, groups=self.par.groups)
        dt = time.perf_counter() - t0
        state.update(step=step + 1, tokens=state["tokens"] + self.tokens_per_step,
                     train_time=state["train_time"] + dt, elapsed=time.perf_counter() - self.start)
        self.load_cv = rec.get("load_cv", self.load_cv)
        self.log.write({"step": step + 1, **rec, "lr": lr, "tokens": state["tokens"],
                        "tokens_per_s": self.tokens_per_step / dt, "elapsed": state["elapsed"]})
        fields = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{self.tokens_per_step / dt:,.0f}"}
        if self.load_cv is not None:
            fields["load_cv"] = f"{self.load_cv:.2f}"
        self.bar.update(step + 1, fields)
        if tc.eval_every and (step + 1) % tc.eval_every == 0:
            self._validate()
            state["elapsed"] = time.perf_counter() - self.start
        if tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0:
            self.par.save(self.out_dir, self.model, self.optimizer, state)

    def _validate(self) -> None:
        tc, step = self.cfg.train, self.state["step"]
        val = evaluate(self.model, self.data, batch_size=tc.batch_size, num_batches=tc.eval_batches,
                       dtype=tc.dtype, device=self.device)
        self.log.write({"step": step, "val_loss": val["val_loss"], "val_bpb": val["val_bpb"]})
        self.bar.write(f"step {step}: val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits/byte")
        self.val = {**val, "step": step}

    def _records(self) -> list[dict]:
        return read_metrics(self.out_dir / "metrics.jsonl") if self.par.is_main else []

    def _finish(self) -> TrainResult:
        state, val, counts = self.state, self.val, self.counts
        tokens_per_s = state["tokens"] / state["train_time"] if state["train_time"] > 0 else 0.0
        # tokens/s counts every rank's tokens; the measured peak is one device's
        mfu = counts.flops_per_token * tokens_per_s / (self.peak * self.par.world_size)
        summary = {"step": state["step"], "tokens": state["tokens"], "val_loss": val["val_loss"],
                   "val_bpb": val["val_bpb"], "tokens_per_s": tokens_per_s,
                   "mfu": mfu, "peak_flops": self.peak,
                   "flops_per_token": counts.flops_per_token, "wall_time_s": state["elapsed"],
                   "train_time_s": state["train_time"], "total_params": counts.total_params,
                   "active_params": counts.active_params, "data": self.data.description,
                   "layers": val["layers"], "load": val["load"]}
        if not self.par.is_main:
            return TrainResult(self.out_dir, summary, [])
        write_json(self.out_dir / "summary.json", summary)
        records = read_metrics(self.out_dir / "metrics.jsonl")
        plot_run(self.out_dir, records, val["load"])
        if self.show:
            print(summary_table(summary))
            print(f"run folder: {self.out_dir}")
        return TrainResult(self.out_dir, summary, records)
