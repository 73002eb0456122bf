"""Aggregating a study's runs into per-arm figures, a Markdown table and a JSON record.

Every loss figure is ``mean ± sd`` over seeds (sample standard deviation, ``n - 1``; with one seed there is
no spread to show and the table says ``n=1``). The difference to the reference arm is paired by seed (same
seed: same initial-weight stream and same batches), ``Δ = mean_s(bpb_arm,s - bpb_ref,s) ± sd``; a difference
smaller than its sd is not distinguishable from seed noise at this number of seeds.

Columns: validation loss (nats/token) and bits per byte at the end of training; active and total
parameters and training FLOPs per token (:func:`moekit.models.count`); the realised training FLOPs
(``tokens * FLOPs per token``, from the run's own summary); tokens/s (training steps only, machine-load
dependent); tokens per CPU second (the run's tokens over the CPU seconds of its training steps, all threads
summed: other processes on a shared machine do not lower it, so with one thread per run it compares the arms'
speed where tokens/s cannot; "-" for runs that predate the ``cpu_time_s`` summary field); peak resident
memory of the run's process; load CV (coefficient of variation of expert load on the validation batches,
averaged over MoE layers); and the study's own statistics (averaged over layers and validation batches, from the
run summary).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import cast

import torch

from .runner import RunOutcome
from .study import Study

__all__ = ["ArmResult", "aggregate", "markdown_report", "results_json", "mean_sd"]


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd (``None`` with fewer than 2 values)."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def _layer_mean(layers: dict, key: str) -> float | None:
    values = [row[key] for row in layers.values() if key in row]
    return statistics.fmean(values) if values else None


@dataclass
class ArmResult:
    """Per-arm figures over its finished seeds."""

    arm: str
    seeds: list[int]
    missing_seeds: list[int]
    val_loss: tuple[float, float | None]
    val_bpb: tuple[float, float | None]
    active_params: int | None
    total_params: int | None
    flops_per_token: int | None
    realised_flops: list[float]
    steps: list[int]
    tokens: list[int]
    tokens_per_s: tuple[float, float | None]
    tokens_per_cpu_s: float | None
    peak_rss_mb: float | None
    load_cv: float | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    delta_bpb: tuple[float, float | None] | None = None
    per_seed_bpb: dict[int, float] = field(default_factory=dict)


def _arm_result(study: Study, arm: str, outcomes: list[RunOutcome]) -> ArmResult:
    done = [o for o in outcomes if o.finished]
    sums = [cast(dict, o.summary) for o in done]  # finished runs have a summary
    first = sums[0] if sums else {}
    peaks = [o.peak_rss_mb for o in done if o.peak_rss_mb is not None]
    layers = [o.routing or s.get("layers") or {} for o, s in zip(done, sums)]
    cvs = [v for v in (_layer_mean(s, "load_cv") for s in layers) if v is not None]
    per_cpu_s = [s["tokens"] / s["cpu_time_s"] for s in sums if s.get("cpu_time_s")]
    metrics = {}
    for key in study.metrics:
        vals = [v for v in (_layer_mean(s, key) for s in layers) if v is not None]
        metrics[key] = statistics.fmean(vals) if vals else None
    return ArmResult(
        arm=arm, seeds=[o.spec.seed for o in done], missing_seeds=[o.spec.seed for o in outcomes if not o.finished],
        val_loss=mean_sd([s["val_loss"] for s in sums]), val_bpb=mean_sd([s["val_bpb"] for s in sums]),
        active_params=first.get("active_params"), total_params=first.get("total_params"),
        flops_per_token=first.get("flops_per_token"),
        realised_flops=[float(s["tokens"]) * s["flops_per_token"] for s in sums],
        steps=[s["step"] for s in sums], tokens=[s["tokens"] for s in sums],
        tokens_per_s=mean_sd([s["tokens_per_s"] for s in sums]),
        tokens_per_cpu_s=statistics.fmean(per_cpu_s) if len(per_cpu_s) == len(sums) and sums else None,
        peak_rss_mb=max(peaks) if peaks else None,
        load_cv=statistics.fmean(cvs) if cvs else None, metrics=metrics,
        per_seed_bpb={o.spec.seed: s["val_bpb"] for o, s in zip(done, sums)})


def aggregate(study: Study, outcomes: list[RunOutcome]) -> list[ArmResult]:
    """One :class:`ArmResult` per arm, in study order, with paired differences to the reference arm."""
    results = [_arm_result(study, a.name, [o for o in outcomes if o.spec.arm == a.name]) for a in study.arms]
    ref = next((r for r in results if r.arm == study.reference), None)
    if ref is not None:
        for r in results:
            common = sorted(set(r.per_seed_bpb) & set(ref.per_seed_bpb))
            if r is not ref and common:
                r.delta_bpb = mean_sd([r.per_seed_bpb[s] - ref.per_seed_bpb[s] for s in common])
    return results


def _pm(pair: tuple[float, float | None] | None, digits: int = 4) -> str:
    if pair is None or math.isnan(pair[0]):
        return "-"
    mean, sd = pair
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{mean:.{digits}f} (n=1)"


def _num(value: float | int | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(study: Study, results: list[ArmResult]) -> list[str]:
    head = ["arm", "seeds", "val loss", "bits/byte", "Δ bits/byte vs " + (study.reference or "-"),
            "active params", "total params", "MFLOP/token", "steps", "train FLOPs", "tokens/s",
            "tokens/CPU s", "peak MiB", "load CV", *study.metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        steps = sorted(set(r.steps))
        flops = f"{statistics.fmean(r.realised_flops):.3g}" if r.realised_flops else "-"
        row = [r.arm, str(len(r.seeds)) + (f" (missing {r.missing_seeds})" if r.missing_seeds else ""),
               _pm(r.val_loss), _pm(r.val_bpb), "(reference)" if r.arm == study.reference else _pm(r.delta_bpb),
               _num(r.active_params), _num(r.total_params),
               _num(None if r.flops_per_token is None else r.flops_per_token / 1e6, "{:.2f}"),
               "/".join(str(s) for s in steps) or "-", flops, _num(r.tokens_per_s[0]) if r.seeds else "-",
               _num(r.tokens_per_cpu_s), _num(r.peak_rss_mb), _num(r.load_cv, "{:.3f}"),
               *(_num(r.metrics.get(k), "{:.3f}") for k in study.metrics)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def machine_line() -> str:
    return (f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} torch threads available, "
            f"{__import__('os').cpu_count()} logical cores, torch {torch.__version__}, Python "
            f"{platform.python_version()}")


def markdown_report(study: Study, results: list[ArmResult], *, command: str, workers: int,
                    plots: list[str]) -> str:
    """The study's ``results.md``: what was compared, under which budget, the table, the plots."""
    seeds = ", ".join(str(s) for s in study.seeds)
    lines = [f"# Study `{study.name}`", "", study.description, ""]
    if study.claim:
        lines += [f"**Claim under test:** {study.claim}", ""]
    lines += [f"- Budget: {study.budget.describe()}.", f"- Seeds: {seeds} (same data and batch order per seed "
              f"across arms).", f"- Command: `{command}`", f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; "
              f"machine: {machine_line()}; {workers} run(s) at a time.", ""]
    staged = [f"`{a.name}` starts from `{a.init_from}`'s trained weights" for a in study.arms if a.init_from]
    if staged:
        lines[-1:-1] = [f"- Two-stage arms: {'; '.join(staged)} (same seed); its budget counts its own steps."]
    lines += _table(study, results)
    lines += ["", "Loss figures are mean ± sample sd over seeds; Δ is paired by seed. tokens/s and peak memory "
              "(max resident set of the run's process) depend on the machine's load at the time; tokens/CPU s "
              "(per CPU second of the training steps, all threads summed) leaves out time spent waiting for a core.", ""]
    if study.budget.kind == "flops":
        lines += ["FLOPs per token come from `moekit.models.count` (6 × matmul parameters + attention scores); "
                  "for a variant module without its own `active_params()` this counts the whole module as "
                  "active.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def results_json(study: Study, results: list[ArmResult], outcomes: list[RunOutcome], *, command: str) -> dict:
    """Everything in the report plus each run's folder, summary figures and validation curve."""
    def arm_dict(r: ArmResult) -> dict:
        d = dict(r.__dict__)
        d["per_seed_bpb"] = {str(k): v for k, v in r.per_seed_bpb.items()}
        return d

    runs = [{"arm": o.spec.arm, "seed": o.spec.seed, "folder": o.folder.name, "init_from": o.spec.init_from,
             "finished": o.finished,
             "cached": o.cached, "planned_flops": o.spec.planned_flops, "peak_rss_mb": o.peak_rss_mb,
             "summary": None if o.summary is None else {k: v for k, v in o.summary.items() if k != "load"},
             "val_curve": o.val_curve} for o in outcomes]
    return {"study": study.name, "description": study.description, "claim": study.claim,
            "source": study.source, "budget": {"kind": study.budget.kind, "amount": study.budget.amount,
                                                  **({"clock": study.budget.clock} if study.budget.kind == "time" else {})},
            "seeds": list(study.seeds), "reference": study.reference, "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_line(),
            "arms": [arm_dict(r) for r in results], "runs": runs}
