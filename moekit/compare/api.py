"""``run_study``: plan, train (or reuse), aggregate and write a study's outputs.

The output folder::

    OUT/runs/<arm>-seed<seed>-<hash>/   one moekit run folder each (config.json, metrics.jsonl, summary.json,
                                        checkpoint, compare.json with the process's peak memory)
    OUT/results.md                      the table and plots
    OUT/results.json                    per-arm figures, per-run summaries and validation curves
    OUT/val_curves.png, OUT/loss_vs_flops.png
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import RunSpec, plan_study
from .plots import plot_study
from .report import ArmResult, aggregate, markdown_report, results_json
from .runner import RunOutcome, default_workers, run_specs
from .study import Study

__all__ = ["run_study", "StudyResult"]


@dataclass
class StudyResult:
    """Outputs of :func:`run_study`."""

    out_dir: Path
    specs: list[RunSpec]
    outcomes: list[RunOutcome]
    arms: list[ArmResult]
    markdown: str
    json: dict

    @property
    def complete(self) -> bool:
        return all(o.finished for o in self.outcomes)


def run_study(study: Study, out_dir: str | Path, *, workers: int | None = None,
              threads: int | None = None, overrides: dict[str, Any] | None = None, progress: bool = True,
              command: str | None = None) -> StudyResult:
    """Train every (arm, seed) of ``study`` not already finished in ``out_dir`` and write the report.

    Args:
        workers: runs at a time, one process each (default: ``min(runs, cores)``); ``0`` trains in this
            process, one run after another, without peak-memory figures.
        threads: ``train.threads`` of each run (default: ``cores // workers``, at least 1).
        overrides: dotted config overrides for every arm (e.g. ``{"train.lr": 1e-3}``); they change the
            runs' cache keys.
        command: the command line recorded in the report (default: the equivalent ``moekit compare``).
    """
    out_dir = Path(out_dir)
    num_runs = len(study.arms) * len(study.seeds)
    n_workers = default_workers(num_runs) if workers is None else workers
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(n_workers, 1))
    specs = plan_study(study, overrides, threads=threads)
    outcomes = run_specs(specs, out_dir, workers=n_workers, progress=progress)
    arms = aggregate(study, outcomes)
    command = command or (f"moekit compare {study.source or study.name}{' --quick' if study.quick else ''} "
                          f"--seeds {len(study.seeds)} --workers {n_workers} --out {out_dir}")
    plots = plot_study(study, outcomes, out_dir)
    markdown = markdown_report(study, arms, command=command, workers=max(n_workers, 1), plots=plots)
    record = results_json(study, arms, outcomes, command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown)
    (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return StudyResult(out_dir, specs, outcomes, arms, markdown, record)
