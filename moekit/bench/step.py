"""The whole training step, timed and profiled: one preset against another in the same run (issue 20).

Dim legend: B batch, S sequence.

:func:`compare_steps` builds each preset's model, optimizer and data exactly as ``moekit train`` does and times
:func:`moekit.training.trainer.train_step` (every micro-batch's forward and backward, clipping, the optimizer
step, the expert-bias update and the step hooks) for the presets alternately (A B A B ..., medians), so the
ratio of the two is measured under the same load. :func:`profile_step` runs a few steps of one preset under
``torch.profiler`` and sums the self CPU time of every operator into the categories of the issue (expert
matmuls, router, balancing loss, routing statistics, attention, optimizer, host syncs...), using profiler
ranges opened by forward hooks on the model's modules (installed here, never in the library's modules).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..training.config import RunConfig
from .timing import alternate_rounds, paired_ratios

__all__ = ["StepHarness", "compare_steps", "profile_step", "format_profile"]


@dataclasses.dataclass
class StepHarness:
    """One preset ready to train: model, optimizer and data as ``moekit train`` builds them."""

    cfg: RunConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Any
    step: int = 0

    @classmethod
    def build(cls, cfg: RunConfig) -> "StepHarness":
        from ..data import load_data
        from ..models import LanguageModel
        from ..training.optim import build_optimizer

        torch.manual_seed(cfg.train.seed)
        model = LanguageModel(cfg.model)
        return cls(cfg, model, build_optimizer(model, cfg.train), load_data(cfg.data))

    def __call__(self, collect_stats: bool | None = None) -> dict:
        """One training step (statistics on the preset's logging steps unless ``collect_stats`` says)."""
        from ..training.trainer import train_step

        tc = self.cfg.train
        stats = self.step % tc.log_every == 0 if collect_stats is None else collect_stats
        out = train_step(self.model, self.optimizer, self.data, self.cfg, self.step, torch.device("cpu"),
                         collect_stats=stats)
        self.step += 1
        return out

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.cfg.model.context


def compare_steps(harnesses: dict[str, StepHarness], repeats: int = 8, warmup: int = 2,
                  tick: Callable[[], None] | None = None, clock: str = "wall") -> dict[str, dict[str, Any]]:
    """Median seconds per training step of each harness, alternated; tokens/s and the ratio to the first
    (on ``clock``: ``wall``, or ``cpu`` for CPU seconds, :mod:`moekit.bench.timing`), and the quartiles of that
    ratio taken round by round (:func:`moekit.bench.timing.paired_ratios`)."""
    rounds = alternate_rounds({name: h for name, h in harnesses.items()}, repeats=repeats, warmup=warmup,
                              tick=tick, clock=clock)
    times = {n: statistics.median(ts) for n, ts in rounds.items()}
    first = next(iter(harnesses))
    rate = {n: harnesses[n].tokens_per_step / t for n, t in times.items()}
    spread = paired_ratios({n: [harnesses[n].tokens_per_step / t for t in ts] for n, ts in rounds.items()}, first)
    return {n: {"step_s": times[n], "tokens_per_s": rate[n], "tokens_per_s_ratio": rate[n] / rate[first],
                "tokens_per_s_ratio_quartiles": list(spread[n])}
            for n in harnesses}


# Module classes whose forward (own ops, children excluded) gets its own profiler range, by category.
def _category_of(module: nn.Module) -> str | None:
    from ..experts import FeedForward
    from ..layers import MoE
    from ..routing import Router

    name = type(module).__name__
    if isinstance(module, Router):
        return "router"
    if isinstance(module, MoE):
        return "moe (dispatch, experts, combine)"
    if isinstance(module, FeedForward):
        return "dense / shared FFN"
    if "Attention" in name:
        return "attention"
    if isinstance(module, nn.RMSNorm | nn.LayerNorm):
        return "norms"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _install_ranges(model: nn.Module) -> list:
    """Forward pre/post hooks that open and close a ``record_function`` range per categorised module."""
    handles = []
    for module in model.modules():
        category = _category_of(module)
        if category is None:
            continue
        stack: list = []

        def pre(mod, args, category=category, stack=stack):
            rf = torch.autograd.profiler.record_function(f"cat::{category}")
            rf.__enter__()
            stack.append(rf)

        def post(mod, args, out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


# Operator names (of the self-CPU-time table) that are host syncs or bookkeeping rather than arithmetic.
_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::tolist", "aten::is_nonzero",
             "aten::equal")


def profile_step(harness: StepHarness, steps: int = 3, warmup: int = 1, collect_stats: bool | None = None
                 ) -> dict:
    """Self CPU time of ``steps`` training steps, by category and by operator (after ``warmup`` steps).

    Forward ops are attributed to the innermost categorised module (router, MoE, FFN, attention...) whose
    forward is running; backward ops (``autograd::engine`` frames) to ``backward``; ``Optimizer.step`` to
    ``optimizer``; the rest (loss, clipping, data, bias update) to ``step (loss, clip, data)``. Operators that
    synchronise with the host or take a data-dependent shape are also listed under ``syncs``.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        harness(collect_stats)
    handles = _install_ranges(harness.model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                harness(collect_stats)
    finally:
        for h in handles:
            h.remove()
    events = [e for e in prof.events() if e.time_range.end >= e.time_range.start]

    def is_range(e) -> bool:
        return (e.name.startswith("cat::") or e.name.startswith("Optimizer.step")
                or e.name.startswith("autograd::engine::evaluate_function"))

    by_cat: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    syncs: dict[str, int] = collections.defaultdict(int)
    total = 0.0
    # One sweep per thread: intervals nest, so a stack of the open ranges gives each op its innermost one.
    stacks: dict[int, list] = collections.defaultdict(list)
    for e in sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end)):
        stack = stacks[e.thread]
        while stack and stack[-1].time_range.end <= e.time_range.start:
            stack.pop()
        if is_range(e):
            stack.append(e)
            continue
        if e.name.startswith("autograd::") or e.name.startswith("Optimizer."):
            continue
        self_us = e.self_cpu_time_total
        total += self_us
        by_op[e.name] += self_us
        if e.name in _SYNC_OPS:
            syncs[e.name] += 1
        inner = stack[-1] if stack else None
        if inner is None:
            cat = "step (loss, clip, data, bias update)"
        elif inner.name.startswith("cat::"):
            cat = "forward: " + inner.name[5:]
        elif inner.name.startswith("Optimizer.step"):
            cat = "optimizer"
        else:
            cat = "backward: " + inner.name.split(": ", 1)[-1]
        by_cat[cat] += self_us
    return {"steps": steps, "total_ms_per_step": total / 1e3 / steps,
            "categories_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "ops_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]},
            "syncs_per_step": {k: v / steps for k, v in syncs.items()}}


def format_profile(name: str, result: dict, top: int = 12) -> str:
    """A readable table of :func:`profile_step`'s categories (ms per step and share)."""
    total = result["total_ms_per_step"]
    lines = [f"## {name}: {total:.1f} ms of operator self time per step (profiled, {result['steps']} steps)"]
    backward = sum(v for k, v in result["categories_ms_per_step"].items() if k.startswith("backward"))
    rows = [(k, v) for k, v in result["categories_ms_per_step"].items() if not k.startswith("backward")]
    rows.append(("backward (all autograd functions)", backward))
    for k, v in sorted(rows, key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {k:<44}{v:>9.1f} ms {100 * v / total:>5.1f}%")
    lines.append("  top backward functions: " + ", ".join(
        f"{k.split(': ', 1)[1]} {v:.1f}" for k, v in result["categories_ms_per_step"].items()
        if k.startswith("backward"))[:600])
    lines.append("  host syncs / data-dependent ops per step: " + (", ".join(
        f"{k} x{v:g}" for k, v in result["syncs_per_step"].items()) or "none"))
    return "\n".join(lines)
