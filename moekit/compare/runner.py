"""Running a study's runs: cached, resumable, one spawned process per run, with a progress display.

- A run whose folder holds ``summary.json`` is finished and is read back, never retrained.
- A run whose folder holds a checkpoint (:func:`~moekit.training.checkpoint.has_checkpoint`) but no finished
  summary was interrupted; it continues with ``train(..., resume=True)``, which takes exactly the steps an
  uninterrupted run takes.
- Otherwise the run starts afresh.

Each run trains in its own spawned process (``ProcessPoolExecutor(max_tasks_per_child=1)``), so its peak
memory is that process's ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the resident set of the whole
process (Python, torch, data, model, optimizer, activations), written to ``compare.json`` in the run folder
with the run's routing statistics (from its summary).
``workers`` processes run at once with ``train.threads = cores // workers`` each. ``workers=0`` trains in
this process one run after another (for debugging and tests; peak memory is then not recorded, since the
process maximum would mix runs).

Ctrl-C reaches the workers too: each finishes its current step, checkpoints and returns; rerunning the
study resumes them.

Two-stage arms (``init_from``) run after the runs they start from: first every run that trains from scratch,
then those that start from a finished one (:func:`start_from` loads its final weights); a two-stage run whose
source did not finish is left for a rerun.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from torch import nn

from ..configs import ConfigError
from ..training.checkpoint import has_checkpoint, read_checkpoint, read_json, write_json
from ..training.metrics import Progress, read_metrics
from .plan import RunSpec, folder_of

__all__ = ["RunOutcome", "run_specs", "default_workers", "peak_rss_mb", "start_from", "COMPARE_FILE"]

COMPARE_FILE = "compare.json"


@dataclass
class RunOutcome:
    """What one run left: its summary (``None`` if it did not finish), validation curve, peak memory."""

    spec: RunSpec
    folder: Path
    summary: dict | None
    val_curve: list[dict] = field(default_factory=list)
    peak_rss_mb: float | None = None
    cached: bool = False
    routing: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.summary is not None and "val_loss" in self.summary


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (``None`` where ``resource`` is missing, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def default_workers(num_runs: int) -> int:
    return max(1, min(num_runs, os.cpu_count() or 1))


def read_outcome(spec: RunSpec, out_dir: Path, cached: bool = False) -> RunOutcome:
    """The outcome recorded in a run folder (finished or not)."""
    folder = folder_of(out_dir, spec)
    summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else None
    extra = read_json(folder / COMPARE_FILE) if (folder / COMPARE_FILE).is_file() else {}
    # elapsed / cpu_time: the clocks at each validation (runs written before they were recorded lack them)
    curve = [{"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"],
              **{k: r[k] for k in ("elapsed", "cpu_time") if k in r}}
             for r in read_metrics(folder / "metrics.jsonl") if "val_loss" in r]
    # the run summary's per-layer statistics include the variants' own (averaged over validation batches)
    routing = (summary or {}).get("layers", {})
    return RunOutcome(spec, folder, summary, curve, extra.get("peak_rss_mb"), cached, routing)


def start_from(source: Path) -> Callable[[nn.Module], None]:
    """``prepare_model`` of a two-stage run: load the final weights of the finished run in ``source`` into the
    fresh model. Every tensor of that run must exist in the model with the same shape; the model's other tensors
    (what the second stage adds) keep their initialisation."""
    def prepare(model: nn.Module) -> None:
        _, tensors, _, _ = read_checkpoint(source)
        own = model.state_dict()
        extra = sorted(set(tensors) - set(own))
        if extra:
            raise ConfigError(f"init_from: the run in {source} has tensors this arm's model lacks ({', '.join(extra[:3])}"
                              f"{', ...' if len(extra) > 3 else ''}); the arm must contain the model it starts from")
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items() if v.shape != own[k].shape]
        if wrong:
            raise ConfigError(f"init_from: tensors of the run in {source} differ in shape from this arm's model "
                              f"({'; '.join(wrong[:3])}); give both arms the same model sizes")
        model.load_state_dict(tensors, strict=False)
    return prepare


def _train_one(spec: RunSpec, out_dir: str, record_memory: bool) -> str:
    """Worker body: train (or resume) one run; returns ``done`` or ``interrupted``."""
    from ..training import train
    folder = folder_of(Path(out_dir), spec)
    resume = has_checkpoint(folder)
    start = time.time()
    prepare = start_from(Path(out_dir) / "runs" / spec.init_from) if spec.init_from is not None else None
    result = train(spec.config, folder, resume=resume, progress=False, prepare_model=prepare)
    finished = "val_loss" in result.summary
    if finished:
        write_json(folder / COMPARE_FILE, {"peak_rss_mb": peak_rss_mb() if record_memory else None,
                                           "resumed": resume, "process_wall_s": time.time() - start,
                                           "threads": spec.config.train.threads})
    return "done" if finished else "interrupted"


def _steps_done(folder: Path) -> int:
    """The last step logged in a run's metrics (cheap enough to poll: a few hundred short lines)."""
    records = read_metrics(folder / "metrics.jsonl")
    return max((r.get("step", 0) for r in records), default=0)


class _Display:
    """One progress bar over all runs, in optimizer steps (in runs for a time budget), plus a line per run."""

    def __init__(self, specs: list[RunSpec], out_dir: Path, enabled: bool) -> None:
        self.out_dir, self.specs, self.enabled = out_dir, specs, enabled
        self.by_steps = all(s.planned_flops is not None for s in specs)
        total = sum(s.config.train.max_steps for s in specs) if self.by_steps else len(specs)
        self.bar = Progress(total, 0, enabled=enabled, unit="step" if self.by_steps else "run", desc="compare ")
        self.done: dict[str, int] = {}
        self.active: set[str] = set()  # submitted and not done (the pool may queue one more than it runs)
        self.workers = 1

    def _position(self) -> int:
        if not self.by_steps:
            return len(self.done)
        return sum(self.done.values()) + sum(_steps_done(self.out_dir / "runs" / f) for f in self.active)

    def refresh(self) -> None:
        self.bar.update(self._position(), {"runs done": f"{len(self.done)}/{len(self.specs)}",
                                           "running": str(min(len(self.active), self.workers))},
                        force=len(self.done) == len(self.specs))

    def finish(self, outcome: RunOutcome, how: str) -> None:
        spec = outcome.spec
        self.active.discard(spec.folder)
        self.done[spec.folder] = spec.config.train.max_steps if self.by_steps else 1
        if outcome.finished:
            s = cast(dict, outcome.summary)  # finished runs have a summary
            self.bar.write(f"{how} {spec.arm} seed {spec.seed}: val loss {s['val_loss']:.4f}, "
                           f"{s['val_bpb']:.4f} bits/byte, {s['step']} steps ({outcome.folder.name})")
        else:
            self.bar.write(f"{how} {spec.arm} seed {spec.seed}: interrupted; rerun the study to resume")
        self.refresh()

    def start_timing(self) -> None:
        """The ETA's rate counts from here: cached runs, finished before, would make it look too fast."""
        self.bar.initial = self._position()
        self.bar.restart_clock()

    def close(self) -> None:
        self.bar.close()


def run_specs(specs: list[RunSpec], out_dir: str | Path, *, workers: int | None = None,
              progress: bool = True) -> list[RunOutcome]:
    """Train every spec not yet finished under ``out_dir/runs/``; returns outcomes in ``specs`` order."""
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, RunOutcome] = {}
    display = _Display(specs, out_dir, progress)
    todo = []
    for spec in specs:
        cached = read_outcome(spec, out_dir, cached=True)
        if cached.finished:
            outcomes[spec.folder] = cached
            display.finish(cached, "cached")
        else:
            todo.append(spec)
    display.start_timing()
    try:
        first = [s for s in todo if s.init_from is None]
        for wave in (first, [s for s in todo if s.init_from is not None]):
            if wave is not first:  # two-stage runs whose source (cached or just run: in outcomes) finished
                wave = [s for s in wave if (o := outcomes.get(str(s.init_from))) is not None and o.finished]
            if workers == 0:
                for spec in wave:
                    display.active.add(spec.folder)
                    _train_one(spec, str(out_dir), record_memory=False)
                    outcomes[spec.folder] = read_outcome(spec, out_dir)
                    display.finish(outcomes[spec.folder], "ran")
            elif wave:
                _run_pool(wave, out_dir, workers or default_workers(len(wave)), outcomes, display)
    finally:
        display.close()
    return [outcomes.get(s.folder) or read_outcome(s, out_dir) for s in specs]


def _run_pool(todo: list[RunSpec], out_dir: Path, workers: int, outcomes: dict[str, RunOutcome],
              display: _Display) -> None:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    display.workers = workers
    if sys.version_info >= (3, 11):  # a fresh process per run
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1)
    else:  # Python 3.10 has no max_tasks_per_child (TypeError): workers are reused across runs
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    with pool:
        futures = {pool.submit(_train_one, spec, str(out_dir), True): spec for spec in todo}
        pending = set(futures)
        try:
            while pending:
                started = {f for f in pending if f.running()}
                display.active |= {futures[f].folder for f in started}
                done, pending = cf.wait(pending, timeout=2.0, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    spec = futures[f]
                    f.result()  # a failed run raises here, with the worker's traceback
                    outcomes[spec.folder] = read_outcome(spec, out_dir)
                    display.finish(outcomes[spec.folder], "ran")
                display.refresh()
        except BaseException:
            for f in pending:
                f.cancel()  # runs not started yet; started ones checkpoint on the same Ctrl-C
            raise

