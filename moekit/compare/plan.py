"""From a study to runs: one fully resolved :class:`~moekit.training.RunConfig` per (arm, seed), budget applied.

Budgets (``tokens_per_step = batch_size * grad_accum * context``, ``F_i`` = training FLOPs per token of arm
``i`` from :func:`moekit.models.count`, i.e. ``6 * matmul params + 12 * layers * dim * context``):

- ``tokens``: ``steps_i = round(tokens / tokens_per_step_i)``.
- ``flops``:  ``steps_i = round(flops / (F_i * tokens_per_step_i))``; the realised budget
  ``steps_i * F_i * tokens_per_step_i`` must be within 1% of the asked one, else the plan is refused (a
  budget of fewer than about 50 steps cannot be matched that closely; raise it).
- ``time``:   ``train.max_seconds = seconds``, ``train.time_clock = clock`` (``wall`` or ``cpu``: training-step
  CPU seconds) and an unbounded step count; the cosine schedule follows that clock. Validation keeps the
  arm's own ``train.eval_every`` (in steps; set it in the study's overrides).

Every run validates ``evals`` times (every ``steps // evals`` steps) and checkpoints at each validation, so
an interrupted study loses at most one interval per run.

Cache key: a run's folder is ``<arm>-seed<seed>-<hash>``, the hash taken over its resolved ``model``,
``data``, ``train`` and ``parallel`` settings, except ``train.threads`` (which changes with ``--workers`` but
not what is computed), and ``train.time_clock`` when it is the default ``wall`` (so the folders of runs made
before that field existed are still found). A two-stage arm's hash (``init_from``) also covers the folder of the
run it starts from, so a changed base gives new runs on top of it. Changing anything that matters gives a new
folder; rerunning an unchanged study finds its finished runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..configs import ConfigError, to_dict
from ..models import count
from ..recipes import merge, preset_dict
from ..training import RunConfig, run_config_from_dict, with_overrides
from .study import Arm, Study

__all__ = ["RunSpec", "plan_study", "arm_config", "run_key", "FLOPS_TOLERANCE"]

FLOPS_TOLERANCE = 0.01
_TIME_BUDGET_STEPS = 10**9  # "no step limit": the time budget ends the run


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: arm, seed, resolved config and where it lives."""

    arm: str
    seed: int
    config: RunConfig
    folder: str
    flops_per_token: int
    tokens_per_step: int
    init_from: str | None = None  # the folder of the run (same seed, another arm) whose weights this one starts from

    @property
    def planned_flops(self) -> float | None:
        """Training FLOPs the run will do (``None`` for a time budget, known only afterwards)."""
        steps = self.config.train.max_steps
        return None if steps >= _TIME_BUDGET_STEPS else float(steps * self.tokens_per_step * self.flops_per_token)


def _arm_dict(arm: Arm, base: str) -> dict[str, Any]:
    name = arm.preset or base
    data = preset_dict(name, resolve_base=False)
    origin = f"preset {name}"
    if "dim" not in data.get("model", {}):  # a variant preset: only the feed-forward; lay it over the base
        data, origin = merge(preset_dict(base), data), f"preset {name} over {base}"
    return {**data, "name": arm.name, "description": f"study arm {arm.name}: {origin}"}


def arm_config(study: Study, arm: Arm, extra: dict[str, Any] | None = None) -> RunConfig:
    """The arm's config before seed and budget: preset (over the base), study, arm and extra overrides."""
    try:
        cfg = run_config_from_dict(_arm_dict(arm, study.base))
        cfg = with_overrides(cfg, study.overrides)
        cfg = with_overrides(cfg, arm.overrides)
        return with_overrides(cfg, extra or {})
    except ConfigError as e:
        raise ConfigError(f"study {study.name!r}, arm {arm.name!r}: {e}") from None


def run_key(cfg: RunConfig, init_from: str | None = None) -> str:
    """A short hash of everything that decides what a run computes (see the module docstring): its settings
    and, for a two-stage arm, the folder of the run whose weights it starts from."""
    d = to_dict(cfg)
    material: dict[str, Any] = {"model": d["model"], "data": d["data"], "parallel": d["parallel"],
                                "train": {**d["train"], "threads": None}}
    if material["train"].get("time_clock") == "wall":
        del material["train"]["time_clock"]
    if init_from is not None:
        material["init_from"] = init_from
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def _budgeted(study: Study, cfg: RunConfig, flops_per_token: int, tokens_per_step: int) -> dict[str, Any]:
    b = study.budget
    if b.kind == "time":
        return {"train.max_steps": _TIME_BUDGET_STEPS, "train.max_seconds": b.amount, "train.time_clock": b.clock}
    per_step = tokens_per_step * (flops_per_token if b.kind == "flops" else 1)
    steps = max(1, round(b.amount / per_step))
    if b.kind == "flops" and abs(steps * per_step - b.amount) > FLOPS_TOLERANCE * b.amount:
        raise ConfigError(f"study {study.name!r}: a budget of {b.amount:.3g} FLOPs is {b.amount / per_step:.2f} "
                          f"steps of {cfg.name!r}, which cannot be matched within {FLOPS_TOLERANCE:.0%}; raise "
                          f"budget.flops to at least {50 * per_step:.3g} (50 steps)")
    interval = max(1, steps // study.evals)
    return {"train.max_steps": steps, "train.max_seconds": None, "train.eval_every": interval,
            "train.checkpoint_every": interval}


def plan_study(study: Study, extra: dict[str, Any] | None = None, threads: int | None = None) -> list[RunSpec]:
    """Every (arm, seed) run of ``study``, arms in file order, seeds in study order.

    Args:
        extra: command-line overrides applied to every arm (before the seed and the budget).
        threads: ``train.threads`` of each run (not part of the cache key).
    """
    specs = []
    for arm in study.arms:
        cfg = arm_config(study, arm, extra)
        c = count(cfg.model)
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.context
        budget = _budgeted(study, cfg, c.flops_per_token, tokens_per_step)
        for seed in study.seeds:
            run = with_overrides(cfg, {**budget, "train.seed": seed})
            run = replace(run, train=replace(run.train, threads=threads))
            specs.append(RunSpec(arm=arm.name, seed=seed, config=run, folder=f"{arm.name}-seed{seed}-{run_key(run)}",
                                 flops_per_token=c.flops_per_token, tokens_per_step=tokens_per_step))
    # two-stage arms: their folders (and hashes) name the run they start from, which needs every folder first
    source = {(s.arm, s.seed): s.folder for s in specs}
    init = {a.name: a.init_from for a in study.arms}
    out = []
    for s in specs:
        base = init[s.arm]
        if base is None:
            out.append(s)
            continue
        folder = source[(base, s.seed)]
        out.append(replace(s, folder=f"{s.arm}-seed{s.seed}-{run_key(s.config, folder)}", init_from=folder))
    return out


def describe_plan(specs: list[RunSpec]) -> str:
    """One line per arm: parameters, FLOPs per token, steps and planned FLOPs (``moekit compare --plan``)."""
    lines, seen = [], set()
    for s in specs:
        if s.arm in seen:
            continue
        seen.add(s.arm)
        c = count(s.config.model)
        steps = s.config.train.max_steps
        tc = s.config.train
        steps_text = (f"{steps:,} steps" if s.planned_flops is not None else
                      f"{tc.max_seconds:g} s ({'CPU seconds of training steps' if tc.time_clock == 'cpu' else 'wall'})")
        flops = f", {s.planned_flops:.3g} FLOPs" if s.planned_flops is not None else ""
        source = next((o.arm for o in specs if o.folder == s.init_from), None)
        staged = f", starting from {source}'s trained weights" if source is not None else ""
        lines.append(f"{s.arm}: {c.total_params:,} params ({c.active_params:,} active), "
                     f"{s.flops_per_token / 1e6:.2f} MFLOP/token, {s.tokens_per_step:,} tokens/step, "
                     f"{steps_text}{flops}{staged}")
    return "\n".join(lines)


def folder_of(out_dir: Path, spec: RunSpec) -> Path:
    return Path(out_dir) / "runs" / spec.folder
