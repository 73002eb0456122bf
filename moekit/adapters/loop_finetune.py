"""``moekit finetune RUN --loop sema|mome``: the whole-model loops of :mod:`moekit.adapters.loops` on a trained run.

Dim legend: B batch, S sequence.

SEMA (spec §23) sees a sequence of tasks, one after another (:func:`~moekit.adapters.loops.sema_continual`); MoME
(spec §22) trains on the run's own data at several pooling rates at once (:func:`~moekit.adapters.loops.mome_train`).
Neither is a plain trainer step, so the loop runs here instead of through the trainer, with the run's
``train.max_steps`` (steps per task for SEMA), ``train.lr``, ``train.batch_size``, ``train.seed`` and the model's
context. The output is a run folder like ``moekit finetune``'s: the base config (with the overrides), the adapter
file, a checkpoint of the adapted model (no optimizer state: a loop run does not resume), and the loop's report
(:func:`moekit.training.checkpoint.loop_report_path`), so ``moekit eval`` / ``moekit sample`` read it.

SEMA tasks are the synthetic tasks of :mod:`moekit.data.synthetic` (``add``, ``mul``, ``copy``, ``sort``: lines of
that task only, bytes) or ``data`` (the run's own data source, windows of its training split).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import ConfigError, to_dict
from ..data import load_data
from ..data.dataset import train_batch
from ..data.synthetic import arithmetic_line, copy_line, sort_line
from ..models import LanguageModel
from ..training.checkpoint import (
    CONFIG_FILE,
    adapters_path,
    load_checkpoint,
    loop_report_path,
    read_state,
    write_checkpoint,
    write_json,
)
from ..training.config import RunConfig
from .api import apply
from .finetune import base_config
from .loops import Sampler, mome_train, sema_continual

__all__ = ["LOOPS", "LOOP_TASKS", "LoopResult", "loop_finetune", "task_sampler"]

LOOPS = {"sema": "sema", "mome": "mome"}  # loop -> the adapter method it trains
LOOP_TASKS = ("add", "mul", "copy", "sort", "data")
_LINES = {"add": lambda rng, d: arithmetic_line(rng, d, "+"), "mul": lambda rng, d: arithmetic_line(rng, d, "*"),
          "copy": lambda rng, d: copy_line(rng), "sort": lambda rng, d: sort_line(rng)}


@dataclass
class LoopResult:
    """What the loop did (``report``: SEMA's per-task records or MoME's per-step losses) and where it wrote."""

    method: str
    trainable_params: int
    adapter_file: Path
    report: list[dict[str, Any]]


def _windows(stream: torch.Tensor, context: int, batch_size: int) -> Sampler:
    def sample(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts_B = torch.randint(0, len(stream) - context - 1, (batch_size,), generator=g)
        window_BS = stream[starts_B[:, None] + torch.arange(context + 1)].long()
        return window_BS[:, :-1], window_BS[:, 1:]
    return sample


def task_sampler(task: str, cfg: RunConfig, num_bytes: int = 60_000) -> Sampler:
    """A sampler of ``(x_BS, y_BS)`` windows of one task (see the module doc), at the run's context and batch."""
    context, batch = cfg.model.context, cfg.train.batch_size
    if task == "data":
        data = load_data(cfg.data)
        return lambda g: train_batch(data, batch, context, int(torch.randint(0, 2**31, (1,), generator=g)), 0)
    if task not in _LINES:
        raise ConfigError(f"unknown task {task!r}; choose from {list(LOOP_TASKS)}")
    if cfg.data.tokenizer != "bytes":
        raise ConfigError(f"the synthetic task {task!r} is byte text, but the run uses data.tokenizer="
                          f"{cfg.data.tokenizer!r}; use the task 'data' or a byte-level base run")
    rng, parts, total = random.Random(cfg.data.seed * 1000 + LOOP_TASKS.index(task)), [], 0
    while total < max(num_bytes, 4 * context):
        parts.append(_LINES[task](rng, cfg.data.max_digits))
        total += len(parts[-1])
    return _windows(torch.tensor(list("".join(parts).encode()), dtype=torch.uint8), context, batch)


def _check(loop: str, tasks: Sequence[str] | None, rates: Sequence[int] | None, cfg: RunConfig) -> None:
    if loop not in LOOPS:
        raise ConfigError(f"unknown loop {loop!r}; choose one of {list(LOOPS)}")
    if loop == "sema":
        if rates is not None:
            raise ConfigError("rates are for the mome loop; remove them for sema")
        if not tasks:
            raise ConfigError(f"the sema loop needs tasks, in the order they arrive: e.g. add,copy,sort (choose from "
                              f"{list(LOOP_TASKS)})")
        unknown = [t for t in tasks if t not in LOOP_TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; choose from {list(LOOP_TASKS)}")
    else:
        if tasks is not None:
            raise ConfigError("tasks are for the sema loop; mome trains on the run's data (set --data.*)")
        bad = [r for r in rates or () if r < 1 or cfg.model.context % r]
        if rates is not None and (not rates or bad):
            raise ConfigError(f"pooling rates {list(rates)} must be integers >= 1 that divide the context "
                              f"{cfg.model.context}; e.g. 1,2,4")


def loop_finetune(base_run: str | Path, out_dir: str | Path, loop: str, *, tasks: Sequence[str] | None = None,
                  rates: Sequence[int] | None = None, targets: list[str] | None = None,
                  options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> LoopResult:
    """Run the ``loop`` (``sema`` or ``mome``) on the frozen model of ``base_run`` into ``out_dir``.

    Args:
        tasks: SEMA's tasks in order (names from :data:`LOOP_TASKS`).
        rates: MoME's pooling rates (default ``(1, 2, 4)``); each divides the context.
        targets, options: as for :func:`moekit.adapters.apply` with the loop's method.
        overrides: dotted ``train.*`` / ``data.*`` overrides of the base run's config.
    """
    overrides = dict(overrides or {})
    base_run, out_dir = Path(base_run), Path(out_dir)
    cfg = base_config(base_run, overrides)
    _check(loop, tasks, rates, cfg)
    method = LOOPS[loop]
    read_state(base_run)  # a base run without a complete checkpoint fails here, before anything is written
    with torch.device("meta"):  # every adapter check (options, targets, ranks) before anything is written
        apply(LanguageModel(cfg.model), method, targets, **(options or {}))
    if adapters_path(out_dir).exists():
        raise ConfigError(f"{out_dir} already holds a fine-tuning run; choose another --out (a loop run does not "
                          f"resume)")
    samplers = [task_sampler(t, cfg) for t in tasks or ("data",)]
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)
    load_checkpoint(base_run, model)
    handle = apply(model, method, targets, **(options or {}))
    steps, lr, seed = cfg.train.max_steps, cfg.train.lr, cfg.train.seed
    if loop == "sema":
        report = sema_continual(model, samplers, steps=steps, lr=lr, seed=seed)
        for record, task in zip(report, tasks or ()):
            record["name"] = task
        trainable = sum(int(r["trainable"]) for r in report)  # over all tasks (each task's own are frozen after it)
    else:
        trainable = handle.num_trainable()
        report = mome_train(model, samplers[0], rates=tuple(rates or (1, 2, 4)), steps=steps, lr=lr, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CONFIG_FILE, to_dict(cfg))
    handle.save(adapters_path(out_dir))
    write_json(loop_report_path(out_dir), {"loop": loop, "tasks": list(tasks or []), "rates": list(rates or []),
                                           "report": report})
    total_steps = steps * len(samplers) if loop == "sema" else steps
    write_checkpoint(out_dir, model.state_dict(), {}, {"step": total_steps, "loop": loop})
    return LoopResult(handle.method, trainable, adapters_path(out_dir), report)
