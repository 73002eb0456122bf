"""Two-stage study arms (``init_from``): an arm that starts from another arm's trained weights, same seed.

Checked: the study refuses bad ``init_from`` with a message that says how to fix it; the plan names the source
run and hashes it into the folder; the runner trains the source first, loads its final weights exactly, skips a
two-stage run whose source did not finish; Dr.LLM's router stage leaves the loaded base untouched.
"""

import json

import pytest
import torch

from moekit.compare import load_study, plan_study, run_key, run_study
from moekit.compare import runner as runner_mod
from moekit.compare.plan import describe_plan, folder_of
from moekit.compare.runner import run_specs, start_from
from moekit.compare.study import study_from_dict
from moekit.configs import ConfigError
from moekit.models import LanguageModel
from moekit.training import load_checkpoint, with_overrides
from moekit.training.checkpoint import read_checkpoint

TINY = {"description": "two stages", "base": "tiny", "seeds": [0, 1],
        "budget": {"kind": "tokens", "tokens": 1280},
        "overrides": {"train": {"eval_batches": 1, "batch_size": 4}, "model": {"context": 32}}}


def study(*arms, **extra):
    return study_from_dict({**TINY, **extra, "arms": list(arms)}, "two-stage")


@pytest.mark.parametrize("arms, message", [
    ([{"name": "a", "init_from": "a"}], "init_from='a', itself; name the arm"),
    ([{"name": "a"}, {"name": "b", "init_from": "c"}], "init_from='c', which is not an arm \\(arms: \\['a', 'b'\\]\\)"),
    ([{"name": "a"}, {"name": "b", "init_from": "a"}, {"name": "c", "init_from": "b"}],
     "arm 'c' starts from arm 'b', which itself starts from 'a'; init_from must name an arm trained from scratch"),
    ([{"name": "a"}, {"name": "b", "init_from": 3}], "init_from=3; give the name of another arm"),
    ([{"name": "a", "init_form": "b"}], "unknown keys \\['init_form'\\] \\(valid: name, preset, overrides, init_from\\)"),
])
def test_bad_init_from_is_refused_with_a_fix(arms, message):
    with pytest.raises(ConfigError, match=message):
        study(*arms)


def test_arms_subset_must_keep_the_source():
    s = study({"name": "base"}, {"name": "more", "init_from": "base"}, {"name": "other"})
    with pytest.raises(ConfigError, match="keep the arms that others start from: more \\(starts from base\\); add"):
        s.with_arms(["more", "other"])
    assert [a.name for a in s.with_arms(["base", "more"]).arms] == ["base", "more"]
    assert [a.name for a in s.with_arms(["other"]).arms] == ["other"]


def test_plan_names_the_source_run_of_the_same_seed_and_hashes_it():
    # the two-stage arm comes first in the file: its source is still found
    s = study({"name": "more", "init_from": "base", "overrides": {"train.lr": 1e-3}}, {"name": "base"})
    specs = plan_study(s)
    by = {(sp.arm, sp.seed): sp for sp in specs}
    for seed in (0, 1):
        more, base = by[("more", seed)], by[("base", seed)]
        assert base.init_from is None and base.folder == f"base-seed{seed}-{run_key(base.config)}"
        assert more.init_from == base.folder
        assert more.folder == f"more-seed{seed}-{run_key(more.config, base.folder)}"
        assert run_key(more.config, base.folder) != run_key(more.config)
    # a different base gives the second stage new runs too, though its own settings did not change
    assert describe_plan(specs).splitlines()[0].endswith(", 10 steps, 2.55e+08 FLOPs, starting from base's trained weights")
    assert "starting from" not in describe_plan(specs).splitlines()[1]
    changed = plan_study(study({"name": "more", "init_from": "base", "overrides": {"train.lr": 1e-3}},
                               {"name": "base", "overrides": {"train.lr": 2e-3}}))
    assert changed[0].config == specs[0].config and changed[0].folder != specs[0].folder


def test_the_second_stage_starts_from_the_first_stages_final_weights(tmp_path):
    # lr 1e-30: the second stage changes nothing (below float32 rounding), so its weights must equal the first
    # stage's, bit for bit
    s = study({"name": "base"}, {"name": "frozen", "init_from": "base", "overrides": {"train.lr": 1e-30}},
              seeds=[0])
    result = run_study(s, tmp_path, workers=0, progress=False)
    base, frozen = result.outcomes
    assert base.finished and frozen.finished and frozen.spec.init_from == base.folder.name
    _, w_base, _, _ = read_checkpoint(base.folder)
    _, w_frozen, _, _ = read_checkpoint(frozen.folder)
    fresh = LanguageModel(frozen.spec.config.model).state_dict()
    assert set(w_base) == set(w_frozen)
    for k in w_base:
        assert torch.equal(w_frozen[k], w_base[k]), k
    assert any(not torch.equal(fresh[k], w_base[k]) for k in w_base)  # the first stage did train
    assert frozen.summary["val_loss"] == pytest.approx(base.summary["val_loss"], abs=1e-6)
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["init_from"] for r in record["runs"]] == [None, base.folder.name]
    assert "- Two-stage arms: `frozen` starts from `base`'s trained weights (same seed)" in (
        tmp_path / "results.md").read_text()


def test_a_second_stage_waits_for_its_source_and_is_skipped_when_it_did_not_finish(tmp_path, monkeypatch):
    specs = plan_study(study({"name": "more", "init_from": "base"}, {"name": "base"}, seeds=[0]))
    order = []

    def fake_train(spec, out_dir, record_memory):
        order.append(spec.arm)
        folder = folder_of(tmp_path, spec)
        folder.mkdir(parents=True)
        summary = {"stopped_early": True} if spec.arm == "base" else {"val_loss": 1.0, "val_bpb": 1.0, "step": 5}
        (folder / "summary.json").write_text(json.dumps(summary))
        return "done"

    monkeypatch.setattr(runner_mod, "_train_one", fake_train)
    outcomes = run_specs(specs, tmp_path, workers=0, progress=False)
    assert order == ["base"]  # the base stopped early: its second stage does not start
    assert not any(o.finished for o in outcomes)
    more, base = specs  # file order
    assert (more.arm, base.arm) == ("more", "base")
    (folder_of(tmp_path, base) / "summary.json").write_text(json.dumps({"val_loss": 2.0, "val_bpb": 2.0, "step": 5}))
    outcomes = run_specs(specs, tmp_path, workers=0, progress=False)
    assert order == ["base", "more"]  # the rerun: the base is finished now, the second stage runs after it
    assert [o.finished for o in outcomes] == [True, True] and [o.cached for o in outcomes] == [False, True]


def test_start_from_refuses_a_model_that_does_not_contain_the_source(tmp_path):
    s = study({"name": "base"}, seeds=[0])
    (base,) = run_study(s, tmp_path, workers=0, progress=False).outcomes
    cfg = base.spec.config
    wider = LanguageModel(with_overrides(cfg, {"model.dim": cfg.model.dim * 2}).model)
    with pytest.raises(ConfigError, match="differ in shape from this arm's model .*; give both arms the same model"):
        start_from(base.folder)(wider)
    shallower = LanguageModel(with_overrides(cfg, {"model.num_layers": cfg.model.num_layers - 1}).model)
    with pytest.raises(ConfigError, match="has tensors this arm's model lacks .*; the arm must contain the model"):
        start_from(base.folder)(shallower)
    same = LanguageModel(cfg.model)
    start_from(base.folder)(same)
    reference = LanguageModel(cfg.model)
    load_checkpoint(base.folder, reference)
    for (k, a), b in zip(same.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


def test_drllm_router_stage_trains_the_routers_on_the_loaded_frozen_base(tmp_path):
    s = load_study("drllm", quick=True).with_arms(["all-layers", "drllm-routers"]).with_seeds(1)
    base, routed = run_study(s, tmp_path, workers=2, threads=1, progress=False).outcomes  # spawned processes
    assert routed.finished and routed.spec.init_from == base.folder.name
    assert routed.spec.config.model.depth_routing["stage"] == "routers"
    _, w_base, _, _ = read_checkpoint(base.folder)
    _, w_routed, _, _ = read_checkpoint(routed.folder)
    routers = [k for k in w_routed if k not in w_base]
    assert routers, "the routed model has router tensors the base lacks"
    for k in w_base:  # the base is frozen in the router stage: it is the loaded one, unchanged
        assert torch.equal(w_routed[k], w_base[k]), k
    fresh = LanguageModel(routed.spec.config.model).state_dict()
    assert any(not torch.equal(w_routed[k], fresh[k]) for k in routers)  # the routers did train
