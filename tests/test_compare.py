"""``moekit compare``: a quick study end to end, equal-FLOPs budgets, the run cache and resuming.

The studies here are the shipped ones in ``--quick`` form (models of ~40k parameters, ~60 steps), so the
whole file runs in well under a minute on 2 CPU cores. Run it alone with ``pytest tests/test_compare.py``.
"""

import json
import shutil

import pytest

from moekit.cli.main import main
from moekit.compare import FLOPS_TOLERANCE, load_study, plan_study, run_key, run_study
from moekit.compare.plan import folder_of
from moekit.compare.study import study_from_dict
from moekit.configs import ConfigError
from moekit.models import count
from moekit.training import train, with_overrides


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """``moe-vs-dense --quick`` (2 arms x 2 seeds) trained in this process."""
    out = tmp_path_factory.mktemp("quick")
    return run_study(load_study("moe-vs-dense", quick=True), out, workers=0, threads=1, progress=False)


def test_cli_quick_study_end_to_end(tmp_path, capsys):
    """The real path: one spawned process per run, two at a time; table, JSON, plots and run folders."""
    code = main(["compare", "moe-vs-dense", "--quick", "--seeds", "1", "--workers", "2", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| dense") or line.startswith("| moe")]
    assert len(rows) == 2 and "(reference)" in rows[0] and "(n=1)" in rows[1]
    record = json.loads((tmp_path / "results.json").read_text())
    assert [a["arm"] for a in record["arms"]] == ["dense", "moe"]
    assert record["budget"] == {"kind": "flops", "amount": 1.5e9} and record["seeds"] == [0]
    for run in record["runs"]:
        assert run["finished"] and not run["cached"]
        assert run["peak_rss_mb"] > 50  # a process with torch imported: tens of MiB at the very least
        assert run["val_curve"][-1]["val_bpb"] == pytest.approx(run["summary"]["val_bpb"])
        assert (tmp_path / "runs" / run["folder"] / "summary.json").is_file()
    moe = record["arms"][1]
    assert moe["load_cv"] is not None and record["arms"][0]["load_cv"] is None  # dense has no routing
    assert (tmp_path / "results.md").read_text().count("| moe") == 1
    assert (tmp_path / "val_curves.png").stat().st_size > 0 and (tmp_path / "loss_vs_flops.png").is_file()


def test_equal_flops_budget_is_realised_within_one_percent(quick_study):
    budget = quick_study.json["budget"]["amount"]
    realised = [o.summary["tokens"] * o.summary["flops_per_token"] for o in quick_study.outcomes]
    assert len(realised) == 4 and all(abs(r - budget) <= FLOPS_TOLERANCE * budget for r in realised)
    assert max(realised) / min(realised) - 1 <= FLOPS_TOLERANCE
    # the trainer really took the planned steps, and counted the FLOPs the planner counted
    for o in quick_study.outcomes:
        assert o.summary["step"] == o.spec.config.train.max_steps
        assert o.summary["flops_per_token"] == o.spec.flops_per_token


def test_equal_flops_gives_cheaper_arms_more_steps():
    """Arms whose FLOPs per token differ by ~30% get step counts in inverse proportion, FLOPs equal within 1%."""
    study = load_study("moe-vs-dense")
    cheap = study_from_dict({"budget": {"kind": "flops", "flops": 4e12}, "base": "coarse",
                             "overrides": study.overrides,
                             "arms": [{"name": "top2"}, {"name": "top1", "overrides": {"model.moe.top_k": 1}},
                                      {"name": "dense", "preset": "dense"}]}, "three")
    specs = plan_study(cheap)
    flops = {s.arm: s.flops_per_token for s in specs}
    assert flops["top1"] < 0.8 * flops["top2"]
    steps = {s.arm: s.config.train.max_steps for s in specs}
    assert steps["top1"] > steps["top2"]
    for s in specs:
        assert s.flops_per_token == count(s.config.model).flops_per_token
        assert abs(s.planned_flops - 4e12) <= FLOPS_TOLERANCE * 4e12
    tiny_budget = study_from_dict({"budget": {"kind": "flops", "flops": 1e11}, "base": "coarse",
                                   "overrides": study.overrides, "arms": [{"name": "a"}]}, "tiny")
    with pytest.raises(ConfigError, match="cannot be matched within 1%; raise budget.flops"):
        plan_study(tiny_budget)


def test_resume_reuses_finished_runs_and_continues_interrupted_ones(quick_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(quick_study.out_dir / "runs", out / "runs")
    victim = quick_study.specs[3]  # moe, seed 1: interrupt it after 20 of its steps
    folder = folder_of(out, victim)
    shutil.rmtree(folder)
    train(victim.config, folder, until_step=20, progress=False)
    assert not (folder / "summary.json").exists()
    stamps = {s.folder: (folder_of(out, s) / "summary.json").stat().st_mtime_ns for s in quick_study.specs[:3]}

    again = run_study(load_study("moe-vs-dense", quick=True), out, workers=0, threads=1, progress=False)
    assert [o.cached for o in again.outcomes] == [True, True, True, False]
    assert all(o.finished for o in again.outcomes)
    for s in quick_study.specs[:3]:  # untouched: not retrained
        assert (folder_of(out, s) / "summary.json").stat().st_mtime_ns == stamps[s.folder]
    resumed = json.loads((folder / "compare.json").read_text())
    assert resumed["resumed"] is True
    # the resumed run ends exactly where the uninterrupted one did
    assert again.outcomes[3].summary["val_loss"] == quick_study.outcomes[3].summary["val_loss"]
    assert [a.val_bpb for a in again.arms] == [a.val_bpb for a in quick_study.arms]


def test_cache_key_follows_what_is_computed_not_threads():
    spec = plan_study(load_study("moe-vs-dense", quick=True), threads=1)[0]
    cfg = spec.config
    assert run_key(with_overrides(cfg, {"train.threads": 2})) == run_key(cfg)
    assert run_key(with_overrides(cfg, {"train.lr": 1e-3})) != run_key(cfg)
    assert run_key(with_overrides(cfg, {"train.seed": 5})) != run_key(cfg)
    assert spec.folder == f"dense-seed0-{run_key(cfg)}"


def test_user_study_file_variant_over_base_and_seed_reduction(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("""
description = "mine"
base = "tiny"
seeds = [3, 4, 5]
[budget]
kind = "tokens"
tokens = 5120
[overrides]
train = { lr = 5e-3 }
[[arms]]
name = "plain"
[[arms]]
name = "topp"
preset = "topp"
overrides = { model = { moe = { num_experts = 4 } } }
""")
    study = load_study(path).with_seeds(2)
    assert study.seeds == (3, 4) and load_study(path).with_seeds(4).seeds == (3, 4, 5, 0)
    specs = plan_study(study)
    assert [(s.arm, s.seed) for s in specs] == [("plain", 3), ("plain", 4), ("topp", 3), ("topp", 4)]
    topp = specs[2].config
    assert topp.model.ffn == "topp" and topp.model.dim == 32 and topp.model.moe.num_experts == 4  # over tiny
    assert all(s.config.train.lr == 5e-3 and s.config.train.max_steps == 40 for s in specs)  # 5120 / (4 * 32)


@pytest.mark.parametrize("text, message", [
    ('arms = [{name = "a"}]', "has no \\[budget\\]"),
    ('budget = {kind = "flop", flops = 1}\narms = [{name = "a"}]', "did you mean 'flops'"),
    ('budget = {kind = "tokens", tokens = 100}\nreference = "b"\narms = [{name = "a"}]', "is not an arm"),
    ('budget = {kind = "tokens", tokens = 100}\narms = [{name = "a"}, {name = "a"}]', "repeat"),
    ('budget = {kind = "tokens", tokens = 100}\nseed = [1]\narms = [{name = "a"}]', "did you mean 'seeds'"),
])
def test_study_errors_say_how_to_fix(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_study(path)


def test_cli_list_plan_and_errors(capsys):
    assert main(["compare", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("moe-vs-dense", "coe", "moepp", "topp", "balancing", "granularity"):
        assert f"{name} " in listed
    assert main(["compare", "granularity", "--quick", "--plan"]) == 0
    assert "fine-shared:" in capsys.readouterr().out
    assert main(["compare", "balancing", "--quick", "--budget", "3840", "--plan"]) == 0
    assert "tokens/step, 30 steps" in capsys.readouterr().out  # 3840 tokens / (4 x 32)
    assert main(["compare", "moe-vs-dens"]) == 2
    assert "did you mean 'moe-vs-dense'" in capsys.readouterr().err


def test_cli_arms_trains_a_subset_and_keeps_the_reference(capsys):
    assert main(["compare", "default-recipe-time", "--quick", "--plan", "--arms", "mid-shared", "dense"]) == 0
    planned = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert planned == ["dense", "mid-shared"]  # the study's order, not the command line's
    assert main(["compare", "default-recipe-time", "--quick", "--plan", "--arms", "mid-shared"]) == 2
    assert "--arms must keep the reference arm 'dense'" in capsys.readouterr().err
    assert main(["compare", "default-recipe-time", "--quick", "--plan", "--arms", "dense", "mid"]) == 2
    err = capsys.readouterr().err
    assert "--arms mid: no such arm in study 'default-recipe-time-quick'" in err and "'fine-shared'" in err
    assert main(["compare", "granularity", "--quick", "--plan", "--arms", "coarse"]) == 0  # the reference alone
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["coarse"]


@pytest.mark.parametrize("name", ["moe-vs-dense", "coe", "moepp", "topp", "balancing", "granularity"])
def test_shipped_studies_plan_in_both_modes(name):
    for quick in (False, True):
        study = load_study(name, quick=quick)
        assert len(study.seeds) >= (2 if quick else 3)
        specs = plan_study(study)
        assert len(specs) == len(study.arms) * len(study.seeds)


def test_coe_study_runs_the_papers_outer_residual_ablation():
    """The ``coe`` study's third arm is its CoE arm with only the block's outer residual added back (the paper's
    ablation, reported ~ plain MoE), in both modes; and ``moepp``'s and ``topp``'s reference runs are one
    configuration (same cache key), so a folder of one serves the other."""
    for quick in (False, True):
        by_arm = {s.arm: s.config for s in plan_study(load_study("coe", quick=quick)) if s.seed == 0}
        assert set(by_arm) == {"moe-top4", "coe-2x-top2", "coe-2x-top2-outer"}
        plain, outer = by_arm["coe-2x-top2"], by_arm["coe-2x-top2-outer"]
        assert plain.model.variant["outer_residual"] is False and outer.model.variant["outer_residual"] is True
        assert with_overrides(outer, {"model.variant.outer_residual": False}).model == plain.model
        assert outer.train == plain.train and outer.data == plain.data
    moepp = {s.seed: s for s in plan_study(load_study("moepp")) if s.arm == "moe"}
    topp = {s.seed: s for s in plan_study(load_study("topp")) if s.arm == "top2"}
    assert {k: run_key(s.config) for k, s in moepp.items()} == {k: run_key(s.config) for k, s in topp.items()}
    assert all(s.config.train.max_steps == 800 for s in moepp.values())  # twice the first runs' 400 steps
