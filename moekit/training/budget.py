"""The training budget's text and bookkeeping: the plan line printed before the first step, how much of a
time budget a run has spent (by ``train.time_clock``), and which override continues a run that spent it."""

from __future__ import annotations

from .config import RunConfig
from .metrics import format_duration

__all__ = ["budget_plan", "spent_budget", "spent_time"]


def budget_plan(cfg: RunConfig, world_size: int = 1) -> str:
    """The line printed before the first step: the governing budget and, where known, its expected duration."""
    tc = cfg.train
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.context * world_size
    text = f"budget: {tc.max_steps:,} steps x {tokens_per_step:,} tokens = {tc.max_steps * tokens_per_step:,} tokens"
    if tc.max_seconds is not None:
        clock = ("of wall time" if tc.time_clock == "wall" else
                 "of this process's CPU time in training steps (train.time_clock=cpu)")
        text += (f", or {format_duration(tc.max_seconds)} {clock} if that comes first (a time budget: how far "
                 f"the run gets depends on the machine's load)")
    if tc.expected_tokens_per_s:
        seconds = tc.max_steps * tokens_per_step / (tc.expected_tokens_per_s * world_size)
        if tc.max_seconds is not None:
            seconds = min(seconds, tc.max_seconds)
        text += (f"; expected duration about {format_duration(seconds)} at {tc.expected_tokens_per_s:,.0f} "
                 f"tokens/s (train.expected_tokens_per_s, 2 idle CPU cores), plus validation")
    return text


def spent_budget(cfg: RunConfig, state: dict) -> str | None:
    """Which override continues a run whose checkpoint ``state`` has reached its budget, or ``None``."""
    tc = cfg.train
    if state["step"] >= tc.max_steps:
        return f"--train.max_steps={2 * tc.max_steps}"
    if tc.max_seconds is not None and spent_time(tc.time_clock, state) >= tc.max_seconds:
        return f"--train.max_seconds={2 * tc.max_seconds:g}"
    return None


def spent_time(clock: str, state: dict) -> float:
    """Seconds of a run's time budget spent, by ``train.time_clock``: wall ``elapsed`` or training-step ``cpu_time``."""
    return float(state.get("elapsed" if clock == "wall" else "cpu_time", 0.0))
