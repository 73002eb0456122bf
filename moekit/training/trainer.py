"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, validation, checkpoints, summary.

Dim legend: B batch, S sequence, V vocabulary.

One optimizer step::

    for each micro-batch m:   loss_m = CE(model(x_m)) + routing losses in ctx;  (loss_m / grad_accum).backward()
                              (a variant may replace loss_m through its training-step hook: moekit.layers.step_hook)
    clip the gradient norm; optimizer.step(); update_expert_biases(model); module.on_step(step) for hooks

The step itself is :func:`moekit.training.step.train_step`; the budget's plan line and bookkeeping are in
:mod:`moekit.training.budget`.

Determinism: weights come from ``torch.manual_seed(train.seed)``; batch ``(step, m)`` is a pure function of
``(seed, step, m)``; a checkpoint holds the weights, the AdamW moments and the RNG state, so a resumed run
takes exactly the steps an uninterrupted one takes (for step budgets; a time budget depends on the clock).

Reliability (docs/reliability.md): the loss and gradient norm are checked every step before the update
(``train.on_nonfinite``); checkpoints are atomic sets written every ``train.checkpoint_every`` steps /
``train.checkpoint_seconds``; Ctrl-C and SIGTERM stop after the step with a checkpoint, summary and plots;
the run folder is locked and checked before anything is written.

Under torchrun the same loop runs on every process, data- and expert-parallel: see
:mod:`moekit.training.distributed` (each rank's micro-batches, gradient reduction, rank-0 logging, full
checkpoints that load into any layout).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs import ConfigError, to_dict
from ..data import load_data, train_batch, val_batches
from ..models import LanguageModel, ModelConfig, count
from ..parallel import has_sharded, read_sharded_info
from .budget import budget_plan, spent_budget, spent_time
from .checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    clean_checkpoints,
    has_checkpoint,
    read_json,
    read_state,
    write_json,
)
from .config import RunConfig
from .display import RunDisplay
from .distributed import Distributed
from .evaluate import evaluate, resolve_device
from .metrics import MetricsLog, TensorBoardLog, measure_matmul_peak, read_metrics, summary_table
from .optim import build_optimizer, learning_rate
from .plots import plot_run
from .rundir import LOCK_FILE, RunLock, check_run_dir
from .signals import StopFlag
from .step import MAX_SKIPPED_IN_A_ROW, NonFiniteError, call_on_step, train_step
from .throughput import SLOW_FACTOR

__all__ = ["SLOW_FACTOR", "NonFiniteError", "TrainResult", "budget_plan", "call_on_step", "spent_budget", "spent_time",
           "train", "train_step"]


@dataclass
class TrainResult:
    """What :func:`train` leaves: the run folder, the final summary and every metrics record."""

    out_dir: Path
    summary: dict
    records: list[dict] = field(default_factory=list)
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run early

    @property
    def losses(self) -> list[float]:
        """Training loss of every step, in step order."""
        return [r["loss"] for r in self.records if "loss" in r]


class _NoLog:
    """The metrics log of ranks other than 0."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _check_model(cfg: RunConfig, out_dir: Path) -> None:
    saved = read_json(out_dir / CONFIG_FILE)
    if saved.get("model") != to_dict(cfg.model):
        raise CheckpointError(f"the model in {out_dir / CONFIG_FILE} differs from the one asked for; resume "
                              f"with the run's own model settings (only train.*, data.* and parallel.* may change)")


def _cpu_seconds() -> float:
    """This process's CPU seconds, all threads summed (``train.time_clock="cpu"``; a seam for tests)."""
    return time.process_time()


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, until_step: int | None = None,
          progress: bool = True, tensorboard: bool = False,
          prepare_model: Callable[[nn.Module], None] | None = None,
          build_model: Callable[[ModelConfig], nn.Module] | None = None) -> TrainResult:
    """Train ``cfg`` into ``out_dir`` (or continue the checkpoint there with ``resume=True``).

    Args:
        until_step: stop after this step with a checkpoint, as if interrupted (the schedule still spans
            ``train.max_steps``); the final validation, summary and plots are then left for the resume.
        progress: show a progress bar / progress lines on stderr and the summary table on stdout.
        tensorboard: also write every metrics record and the per-layer routing statistics of each
            validation as TensorBoard scalars into ``out_dir/tensorboard`` (needs the ``tensorboard`` package).
        prepare_model: called on the freshly built model before the optimizer is made (and before a resumed
            checkpoint is loaded), e.g. to load pre-trained weights and inject adapters; only parameters that
            still require gradients are trained.
        build_model: builds the model instead of ``LanguageModel(cfg.model)`` (e.g. a transformers model behind
            the same ``model(x_BS, ctx) -> (logits_BSV, ctx)`` interface, whose ``config`` is ``cfg.model``).

    Under torchrun (or with ``cfg.parallel.ep_size > 1``, which needs it) every process calls this; rank 0
    writes the folder and prints, and the other ranks' results carry no metrics records.

    The writing process holds an exclusive lock on the folder (:class:`~moekit.training.rundir.RunLock`), and
    everything (folder, data, checkpoint, model) is checked before the first file is written.

    Returns:
        The run folder, the summary (validation loss and bits per byte, tokens/s, MFU, wall time, per-layer
        load statistics) and every metrics record.
    """
    out_dir = Path(out_dir)
    if resume:
        use_sharded = has_sharded(out_dir) and (cfg.parallel.checkpoint == "sharded" or not has_checkpoint(out_dir))
        state = read_sharded_info(out_dir) if use_sharded else read_state(out_dir)
        override = spent_budget(cfg, state)
        if override is not None:  # said even with progress off: otherwise the call silently does nothing
            if os.environ.get("RANK", "0") == "0":  # once under torchrun
                print(f"{out_dir} finished: its checkpoint is at step {state['step']:,} and has spent its budget "
                      f"(train.max_steps={cfg.train.max_steps}, train.max_seconds={cfg.train.max_seconds}); to train "
                      f"on, resume with a larger budget, e.g. moekit train --resume --out {out_dir} {override}",
                      file=sys.stderr, flush=True)
            summary_path = out_dir / "summary.json"
            summary = read_json(summary_path) if summary_path.is_file() else dict(state)
            return TrainResult(out_dir, summary, read_metrics(out_dir / "metrics.jsonl"))
    par = Distributed.start(cfg)  # a single process unless torchrun launched this one
    lock = RunLock(out_dir)
    created = not out_dir.exists()
    ok = wrote = False
    try:
        def open_folder() -> None:
            check_run_dir(out_dir, resume)
            lock.acquire()
            check_run_dir(out_dir, resume)  # again, now that no other writer can change it
            if resume:
                _check_model(cfg, out_dir)
            elif has_sharded(out_dir):
                raise CheckpointError(f"{out_dir} already holds a run (a sharded checkpoint); pass --resume to "
                                      f"continue it or choose another --out")
        par.on_main(open_folder)
        threads = torch.get_num_threads()
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        try:
            run = _Run(cfg, out_dir, resume, progress, par, tensorboard,  # data, model, checkpoint:
                       prepare_model, build_model)  # may still refuse
            wrote = True

            def start_writing() -> None:
                write_json(out_dir / CONFIG_FILE, to_dict(cfg))
                clean_checkpoints(out_dir)  # what an earlier, killed writer left
            par.on_main(start_writing)
            result = run.loop(until_step)
        except RuntimeError as e:  # a peer died or hung: say so in one line, on every surviving rank
            par.explain_failure(e, out_dir, cfg.parallel.timeout_s)
            raise
        finally:
            torch.set_num_threads(threads)
        ok = True
        return result
    finally:
        par.close(ok)
        lock.release()
        if not wrote and created and par.is_main and out_dir.is_dir():  # refused: leave nothing behind
            (out_dir / LOCK_FILE).unlink(missing_ok=True)
            if not any(out_dir.iterdir()):
                out_dir.rmdir()


class _Run:
    """The state of one training invocation: model, optimizer, data, bookkeeping."""

    def __init__(self, cfg: RunConfig, out_dir: Path, resume: bool, progress: bool, par: Distributed,
                 tensorboard: bool = False, prepare_model: Callable[[nn.Module], None] | None = None,
                 build_model: Callable[[ModelConfig], nn.Module] | None = None) -> None:
        tc = cfg.train
        self.cfg, self.out_dir, self.par = cfg, out_dir, par
        self.show = progress and par.is_main
        self.device = par.device(resolve_device(tc.device))
        torch.manual_seed(tc.seed)  # the same on every rank: identical full weights before sharding
        self.model = (build_model or LanguageModel)(cfg.model).to(self.device)
        if prepare_model is not None:
            prepare_model(self.model)
            if not any(p.requires_grad for p in self.model.parameters()):
                raise ConfigError("nothing to train: every parameter of the prepared model is frozen; give the "
                                  "fine-tuning method some targets (or unfreeze parameters)")
        self.counts = count(self.model)  # of the whole model, before sharding
        par.shard(self.model)
        self.optimizer = build_optimizer(self.model, tc)
        self.data = load_data(cfg.data)
        if self.data.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer {cfg.data.tokenizer!r} has {self.data.tokenizer.vocab_size} tokens "
                              f"but model.vocab_size={cfg.model.vocab_size}; set "
                              f"--model.vocab_size={self.data.tokenizer.vocab_size}")
        # Too little data fails here, before anything is written, rather than at the first step.
        train_batch(self.data, 1, cfg.model.context, tc.seed, 0)
        next(val_batches(self.data, 1, cfg.model.context, 1))
        self.peak = measure_matmul_peak(self.device)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "train_time": 0.0, "cpu_time": 0.0}
        if resume:
            self.state = {"cpu_time": 0.0, **par.load(out_dir, self.model, self.optimizer)}
            call_on_step(self.model, self.state["step"])  # hooks that keep state re-derive it from the step
        self.resume = resume
        self.log: MetricsLog | _NoLog = _NoLog()  # opened by loop(), once the run is known to start
        self.last_save = (self.state["step"], self.state["elapsed"])
        self.saved = resume  # a resumed run's checkpoint is of its current step
        self.skipped_in_a_row = 0
        self.tb = TensorBoardLog(out_dir / "tensorboard") if tensorboard and par.is_main else None
        self.display = RunDisplay(tc, self.state, show=self.show, check_throughput=par.is_main,
                              world_size=par.world_size)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.context * par.world_size
        self.val: dict[str, Any] | None = None
        self.load_cv = None
        c = self.counts
        self.display.write(f"{cfg.name}: {c.total_params:,} params ({c.active_params:,} active), "
                       f"{c.flops_per_token / 1e6:.1f} MFLOP/token; data: {self.data.description}; "
                       f"matmul peak {self.peak / 1e9:.0f} GFLOP/s; run folder {out_dir}{par.describe()}")
        self.display.write(budget_plan(cfg, par.world_size))

    def loop(self, until_step: int | None) -> TrainResult:
        tc, state = self.cfg.train, self.state
        stop_at = min(tc.max_steps, until_step) if until_step is not None else tc.max_steps
        if self.par.is_main:
            self.log = MetricsLog(self.out_dir / "metrics.jsonl",
                                  resume_step=state["step"] if self.resume else None)
        self.start = time.perf_counter() - state["elapsed"]
        try:
            with StopFlag() as stop:
                while state["step"] < stop_at:
                    # Every rank takes the same decision, on rank 0's clock (the schedule follows it too).
                    elapsed, stopped = self.par.agree(time.perf_counter() - self.start, stop.requested)
                    spent = elapsed if tc.time_clock == "wall" else self.par.agree(state["cpu_time"], False)[0]
                    if stopped or (tc.max_seconds is not None and spent >= tc.max_seconds):
                        break
                    self._step(elapsed, spent)
                self._save()
                _, stopped = self.par.agree(0.0, stop.requested)
                if stopped or (until_step is not None and state["step"] < tc.max_steps):
                    launch = "moekit" if not self.par.is_distributed else "torchrun ... -m moekit"
                    self.display.write(f"stopped at step {state['step']}; continue with: "
                                   f"{launch} train --resume --out {self.out_dir}")
                    if not stopped:  # until_step: the resume writes the summary
                        return TrainResult(self.out_dir, dict(state), self._records())
                    self.log.close()
                    return self._stopped_early(stop.by or "signal")
                if self.val is None or self.val["step"] != state["step"]:
                    self._validate()
        finally:
            self.display.close()
            self.log.close()
            if self.tb is not None:
                self.tb.close()
        return self._finish()

    def _step(self, elapsed: float, spent: float) -> None:
        """One step; ``elapsed`` is the agreed wall time, ``spent`` the time budget's clock (see time_clock)."""
        tc, state, step = self.cfg.train, self.state, self.state["step"]
        lr = learning_rate(tc, step, max(step / tc.max_steps, spent / tc.max_seconds if tc.max_seconds else 0.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        rec = train_step(self.model, self.optimizer, self.data, self.cfg, step, self.device,
                         collect_stats=step % tc.log_every == 0, groups=self.par.groups)
        dt, cpu_dt = time.perf_counter() - t0, _cpu_seconds() - cpu0
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if rec.get("skipped") else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(f"step {step + 1}: {MAX_SKIPPED_IN_A_ROW} steps in a row had a non-finite loss or "
                                 f"gradient norm and were skipped; training stopped (the last checkpoint is kept). "
                                 f"Lower --train.lr (now {tc.lr})")
        if rec.get("skipped"):
            self.display.write(f"step {step + 1}: non-finite loss or gradient norm; step skipped")
        state.update(step=step + 1, tokens=state["tokens"] + self.tokens_per_step,
                     train_time=state["train_time"] + dt, elapsed=time.perf_counter() - self.start,
                     cpu_time=state["cpu_time"] + cpu_dt)
        self.load_cv = rec.get("load_cv", self.load_cv)
        record = {"step": step + 1, **rec, "lr": lr, "tokens": state["tokens"],
                  "tokens_per_s": self.tokens_per_step / dt, "elapsed": state["elapsed"], "cpu_time": state["cpu_time"]}
        self.log.write(record)
        if self.tb is not None:
            self.tb.write(record)
        self.display.step(state, rec["loss"], self.tokens_per_step / dt, self.load_cv)
        if tc.eval_every and (step + 1) % tc.eval_every == 0:
            self._validate()
            state["elapsed"] = time.perf_counter() - self.start
        by_steps = tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0
        # elapsed is rank 0's clock, agreed on by every rank: they all take this decision together
        by_time = tc.checkpoint_seconds and elapsed - self.last_save[1] >= tc.checkpoint_seconds
        if by_steps or by_time:
            self._save(elapsed)

    def _save(self, elapsed: float | None = None) -> None:
        """Checkpoint (once per step: a save at the step of the last one is skipped)."""
        state = self.state
        if self.last_save[0] == state["step"] and self.saved:  # the same on every rank
            return
        self.par.save(self.out_dir, self.model, self.optimizer, state)
        self.last_save = (state["step"], state["elapsed"] if elapsed is None else elapsed)
        self.saved = True

    def _validate(self) -> None:
        tc, step = self.cfg.train, self.state["step"]
        val = evaluate(self.model, self.data, batch_size=tc.batch_size, num_batches=tc.eval_batches,
                       dtype=tc.dtype, device=self.device)
        # the per-layer routing statistics (variants' own included) go with each evaluation, so that a
        # router's sharpening can be read along the curve, not only at the end (summary.json's "layers")
        self.log.write({"step": step, "val_loss": val["val_loss"], "val_bpb": val["val_bpb"], "layers": val["layers"],
                        "elapsed": self.state["elapsed"], "cpu_time": self.state["cpu_time"]})
        if self.tb is not None:
            self.tb.write({"step": step, "val_loss": val["val_loss"], "val_bpb": val["val_bpb"]})
            self.tb.write_layers(step, val["layers"])
        self.display.write(f"step {step}: val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits/byte")
        self.val = {**val, "step": step}

    def _stopped_early(self, by: str) -> TrainResult:
        """A signal stopped the run: a summary of what was done (no ``val_loss``: the run is not finished)
        and the plots, so that an early stop is still readable."""
        records = self._records()
        train_losses = [r["loss"] for r in records if "loss" in r]
        summary = {**self._progress_summary(), "stopped_early": True, "stopped_by": by,
                   "max_steps": self.cfg.train.max_steps, "last_loss": train_losses[-1] if train_losses else None,
                   "last_val_loss": self.val["val_loss"] if self.val else None}
        if self.par.is_main:
            write_json(self.out_dir / "summary.json", summary)
            plot_run(self.out_dir, records, self.val["load"] if self.val else {})
        return TrainResult(self.out_dir, summary, records, stopped_by=by)

    def _progress_summary(self) -> dict[str, Any]:
        """The summary fields of a finished and of an interrupted run: how far it got, at what speed, on what."""
        state, counts = self.state, self.counts
        return {"step": state["step"], "tokens": state["tokens"],
                "tokens_per_s": state["tokens"] / state["train_time"] if state["train_time"] > 0 else 0.0,
                "wall_time_s": state["elapsed"], "train_time_s": state["train_time"], "cpu_time_s": state["cpu_time"],
                "total_params": counts.total_params, "active_params": counts.active_params,
                "data": self.data.description}

    def _records(self) -> list[dict]:
        return read_metrics(self.out_dir / "metrics.jsonl") if self.par.is_main else []

    def _finish(self) -> TrainResult:
        val, counts = self.val, self.counts
        assert val is not None  # the loop evaluates before it finishes
        summary = self._progress_summary()
        # tokens/s counts every rank's tokens; the measured peak is one device's
        mfu = counts.flops_per_token * summary["tokens_per_s"] / (self.peak * self.par.world_size)
        summary.update(val_loss=val["val_loss"], val_bpb=val["val_bpb"], mfu=mfu, peak_flops=self.peak,
                       flops_per_token=counts.flops_per_token, time_clock=self.cfg.train.time_clock,
                       expected_tokens_per_s=self.cfg.train.expected_tokens_per_s, layers=val["layers"],
                       load=val["load"])
        if not self.par.is_main:
            return TrainResult(self.out_dir, summary, [])
        write_json(self.out_dir / "summary.json", summary)
        records = read_metrics(self.out_dir / "metrics.jsonl")
        plot_run(self.out_dir, records, val["load"])
        if self.show:
            print(summary_table(summary))
            print(f"run folder: {self.out_dir}")
        return TrainResult(self.out_dir, summary, records)
