"""``moekit.compare.report``: per-arm figures, paired differences and the table, from hand-made run outcomes.

No training here: each outcome carries a summary written by hand, so every figure in the table is known.
"""

from pathlib import Path

import pytest
import torch

from moekit.compare.plan import RunSpec
from moekit.compare.report import aggregate, markdown_report
from moekit.compare.runner import RunOutcome
from moekit.compare.study import study_from_dict
from moekit.models import ModelConfig
from moekit.training import RunConfig

CONFIG = RunConfig(model=ModelConfig(dim=8, num_layers=1, num_heads=1, context=4))  # not read by the report
STUDY = study_from_dict({"base": "tiny", "reference": "dense", "budget": {"kind": "tokens", "tokens": 1000},
                         "arms": [{"name": "dense"}, {"name": "moe"}]}, "s")


def outcome(arm: str, seed: int, bpb: float | None, *, tokens: int = 6000, cpu: float | None = 2.0,
            tps: float = 1000.0) -> RunOutcome:
    spec = RunSpec(arm=arm, seed=seed, config=CONFIG, folder=f"{arm}-{seed}", flops_per_token=10,
                   tokens_per_step=100)
    summary = None if bpb is None else {
        "val_loss": bpb * 0.7, "val_bpb": bpb, "step": tokens // 100, "tokens": tokens, "tokens_per_s": tps,
        "flops_per_token": 10, "active_params": 5, "total_params": 9,
        **({"cpu_time_s": cpu} if cpu is not None else {})}
    return RunOutcome(spec=spec, folder=Path(spec.folder), summary=summary)


def row(lines: list[str], arm: str) -> list[str]:
    line = next(x for x in lines if x.startswith(f"| {arm} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_paired_difference_uses_only_the_seeds_both_arms_finished():
    dense, moe = aggregate(STUDY, [outcome("dense", 0, 2.0), outcome("dense", 1, 2.2), outcome("dense", 2, 2.4),
                                   outcome("moe", 0, 1.9), outcome("moe", 1, 2.3), outcome("moe", 2, None)])
    assert dense.delta_bpb is None and dense.seeds == [0, 1, 2]
    assert moe.seeds == [0, 1] and moe.missing_seeds == [2]
    assert moe.delta_bpb[0] == pytest.approx(0.0)  # (-0.1 + 0.1) / 2: seed 2 (unfinished) is left out
    assert moe.delta_bpb[1] == pytest.approx(0.1 * 2 ** 0.5)
    assert moe.val_bpb[0] == pytest.approx(2.1) and dense.val_bpb[0] == pytest.approx(2.2)


def test_tokens_per_cpu_second_is_the_mean_over_seeds_and_shows_in_the_table():
    results = aggregate(STUDY, [outcome("dense", 0, 2.0, cpu=2.0, tps=10.0), outcome("dense", 1, 2.1, cpu=3.0),
                                outcome("moe", 0, 1.9, cpu=4.0), outcome("moe", 1, 2.0, cpu=None)])
    dense, moe = results
    assert dense.tokens_per_cpu_s == pytest.approx((3000 + 2000) / 2)
    assert moe.tokens_per_cpu_s is None  # a run without cpu_time_s: no mean over a subset of the seeds
    text = markdown_report(STUDY, results, command="moekit compare s", workers=1, plots=[]).splitlines()
    head = row(text, "arm")
    col = head.index("tokens/CPU s")
    assert head[col - 1] == "tokens/s"
    assert row(text, "dense")[col] == "2,500" and row(text, "moe")[col] == "-"
    assert row(text, "dense")[col - 1] == f"{(10.0 + 1000.0) / 2:,.0f}"
    assert row(text, "moe")[head.index("Δ bits/byte vs dense")] == "-0.1000 ± 0.0000"  # -0.1 on both seeds
    assert "leaves out time spent waiting for a core" in "\n".join(text)


def test_header_and_an_arm_with_no_finished_seed():
    results = aggregate(STUDY, [outcome("dense", 0, 2.0), outcome("moe", 0, None)])
    text = markdown_report(STUDY, results, command="c", workers=1, plots=["val_curves.png"]).splitlines()
    assert row(text, "arm") == ["arm", "seeds", "val loss", "bits/byte", "Δ bits/byte vs dense", "active params",
                                "total params", "MFLOP/token", "steps", "train FLOPs", "tokens/s", "tokens/CPU s",
                                "peak MiB", "load CV"]
    assert row(text, "dense")[:4] == ["dense", "1", "1.4000 (n=1)", "2.0000 (n=1)"]
    moe = row(text, "moe")
    assert moe[1] == "0 (missing [0])" and moe[2:5] == ["-", "-", "-"] and moe[8:12] == ["-", "-", "-", "-"]
    assert "![val_curves.png](val_curves.png)" in text


def test_results_json_keeps_every_figure_and_each_runs_summary_without_the_load_table():
    from moekit.compare.report import results_json

    runs = [outcome("dense", 0, 2.0), outcome("dense", 1, 2.2), outcome("moe", 0, 1.9), outcome("moe", 1, None)]
    runs[0].summary["load"] = {"layers.0.ffn": [0.5, 0.5]}
    record = results_json(STUDY, aggregate(STUDY, runs), runs, command="moekit compare s")
    assert (record["study"], record["description"], record["claim"], record["command"]) == ("s", "", "",
                                                                                            "moekit compare s")
    assert record["budget"] == {"kind": "tokens", "amount": 1000} and record["reference"] == "dense"
    assert set(record) == {"study", "description", "claim", "source", "budget", "seeds", "reference", "command",
                           "date", "machine", "arms", "runs"}
    assert record["seeds"] == list(STUDY.seeds) and record["source"] == STUDY.source
    assert record["date"][:2] == "20" and "torch " + torch.__version__ in record["machine"]
    timed = study_from_dict({"base": "tiny", "budget": {"kind": "time", "seconds": 60, "clock": "cpu"},
                             "arms": [{"name": "a"}]}, "t")
    assert results_json(timed, [], [], command="c")["budget"] == {"kind": "time", "amount": 60, "clock": "cpu"}
    dense, moe = record["arms"]
    assert dense["per_seed_bpb"] == {"0": 2.0, "1": 2.2} and dense["tokens_per_cpu_s"] == pytest.approx(3000)
    assert moe["delta_bpb"][0] == pytest.approx(-0.1) and moe["missing_seeds"] == [1]
    first, last = record["runs"][0], record["runs"][-1]
    assert first["arm"] == "dense" and first["seed"] == 0 and first["finished"] and "load" not in first["summary"]
    assert first["summary"]["val_bpb"] == 2.0 and first["folder"] == "dense-0"
    assert last["summary"] is None and not last["finished"]


def test_routing_statistics_and_the_studys_own_metrics_reach_the_table():
    study = study_from_dict({"base": "tiny", "reference": "dense", "budget": {"kind": "tokens", "tokens": 1000},
                             "metrics": ["dead_experts"], "arms": [{"name": "dense"}, {"name": "moe"}]}, "s")
    layers = {"l0": {"load_cv": 0.2, "dead_experts": 1.0}, "l1": {"load_cv": 0.4, "dead_experts": 0.0}}
    runs = [outcome("dense", 0, 2.0), outcome("moe", 0, 1.9), outcome("moe", 1, 1.8)]
    for o in runs[1:]:
        o.summary.update(layers=layers, flops_per_token=7_305_005)  # 7.305005 M: rounds to 7.31, not 7.30
    runs[2].routing = {"l0": {"load_cv": 0.9, "dead_experts": 3.0}}  # the evaluation's own record wins
    results = aggregate(study, runs)
    moe = results[1]
    assert moe.load_cv == pytest.approx((0.3 + 0.9) / 2) and moe.metrics["dead_experts"] == pytest.approx(1.75)
    assert results[0].load_cv is None and results[0].metrics == {"dead_experts": None}
    text = markdown_report(study, results, command="c", workers=1, plots=[]).splitlines()
    head, cells = row(text, "arm"), row(text, "moe")
    assert head[-1] == "dead_experts" and cells[-1] == "1.750" and cells[head.index("load CV")] == "0.600"
    assert cells[head.index("MFLOP/token")] == "7.31" and row(text, "dense")[head.index("load CV")] == "-"
    assert any(line.startswith("Loss figures are mean ± sample sd over seeds; Δ is paired by seed.") for line in text)


def test_the_date_line_and_the_flops_note_of_an_equal_flops_study():
    import re

    flops = study_from_dict({"base": "tiny", "budget": {"kind": "flops", "flops": 1e9}, "arms": [{"name": "a"}]}, "f")
    text = markdown_report(flops, aggregate(flops, [outcome("a", 0, 2.0)]), command="c", workers=3, plots=[])
    assert re.search(r"^- Date: 20\d\d-[01]\d-[0-3]\d [0-2]\d:[0-5]\d .*; 3 run\(s\) at a time\.$", text, re.M)
    assert "\nFLOPs per token come from `moekit.models.count` (6 × matmul parameters + attention scores); " in text
    assert "FLOPs per token come from" not in markdown_report(STUDY, [], command="c", workers=1, plots=[])
