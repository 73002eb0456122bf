"""The study definition of ``moekit compare`` (``moekit.compare.study``): budgets, seeds, arms and the ``[quick]``
table, checked to the message. Pure config work: no training here."""

from importlib import resources

import pytest
import tomllib

from moekit.compare.study import Budget, list_studies, study_from_dict
from moekit.configs import ConfigError

BASE = {"base": "tiny", "budget": {"kind": "tokens", "tokens": 1000}, "arms": [{"name": "a"}, {"name": "b"}]}


def study(**fields):
    return study_from_dict({**BASE, **fields}, "s")


def test_budget_describes_each_kind():
    assert Budget(kind="tokens", amount=1234567).describe() == "equal training tokens (1,234,567 per run)"
    assert Budget(kind="flops", amount=3.02e13).describe() == "equal training FLOPs (3.02e+13 per run)"
    assert Budget(kind="time", amount=90).describe() == "equal wall time (90 s of training per run)"
    assert Budget(kind="time", amount=1500, clock="cpu").describe() == (
        "equal CPU time (1500 CPU seconds of training steps per run)")


def test_with_seeds_keeps_the_studys_seeds_then_continues_with_unused_ones():
    s = study(seeds=[0, 2])
    assert s.with_seeds(1).seeds == (0,) and s.with_seeds(2).seeds == (0, 2)
    assert s.with_seeds(4).seeds == (0, 2, 1, 3)  # 0 and 2 are taken: 1, then 3
    assert study(seeds=[1, 0]).with_seeds(5).seeds == (1, 0, 2, 3, 4)
    with pytest.raises(ConfigError, match=r"^--seeds 0 must be >= 1$"):
        s.with_seeds(0)


def test_with_arms_names_every_unknown_arm():
    s = study(arms=[{"name": "a"}, {"name": "b"}, {"name": "c"}], reference="a")
    assert [a.name for a in s.with_arms(["c", "a"]).arms] == ["a", "c"]
    with pytest.raises(ConfigError, match=r"^--arms x y: no such arm in study 's' \(arms: \['a', 'b', 'c'\]\)$"):
        s.with_arms(["a", "x", "y"])


def test_list_studies_gives_each_shipped_files_description():
    listed = dict(list_studies())
    assert list(listed) == sorted(listed) and "default-recipe-time" in listed
    text = resources.files("moekit.recipes").joinpath("studies", "default-recipe-time.toml").read_text()
    assert listed["default-recipe-time"] == tomllib.loads(text)["description"]
    assert all(description for description in listed.values())


def quick(table, **fields):
    return study_from_dict({**BASE, **fields, "quick": table}, "s", quick=True)


def test_quick_table_applies_common_then_per_arm_overrides():
    s = quick({"seeds": [7], "evals": 3, "budget": {"kind": "tokens", "tokens": 64},
               "overrides": {"train": {"lr": 0.5}, "model.dim": 16},
               "arms": {"b": {"model.dim": 8}}}, overrides={"train.lr": 0.1})
    assert s.name == "s-quick" and s.quick and s.seeds == (7,) and s.evals == 3
    assert s.budget == Budget(kind="tokens", amount=64)
    a, b = s.arms
    assert a.overrides == {"train.lr": 0.5, "model.dim": 16}
    assert b.overrides == {"train.lr": 0.5, "model.dim": 8}
    # only seeds: the arms keep their own overrides and the study its budget
    plain = quick({"seeds": [1]}, arms=[{"name": "a", "overrides": {"model.dim": 24}}])
    assert plain.arms[0].overrides == {"model.dim": 24} and plain.budget == Budget(kind="tokens", amount=1000)


@pytest.mark.parametrize("table, message", [
    (None, r"^study 's' has no \[quick\] table, so --quick cannot shrink it; add one \(seeds, budget, overrides, "
           r"arms\) or run without --quick$"),
    ({"seed": [1]}, r"^study 's': \[quick\] has unknown keys \['seed'\] \(valid: seeds, budget, overrides, arms, "
                    r"evals\)$"),
    ({"arms": {"z": {}}}, r"^study 's': quick.arms.z names no arm \(arms: \['a', 'b'\]\)$"),
    ({"overrides": 3}, r"^quick.overrides must be a table of config overrides, got 3$"),
    ({"arms": {"b": 3}}, r"^quick.arms.b must be a table of config overrides, got 3$"),
])
def test_quick_table_errors(table, message):
    data = {**BASE} if table is None else {**BASE, "quick": table}
    with pytest.raises(ConfigError, match=message):
        study_from_dict(data, "s", quick=True)


def test_study_keeps_its_description_claim_and_metrics():
    s = study(description="what", claim="why", metrics=["load_cv", "dead_experts"])
    assert (s.description, s.claim, s.metrics) == ("what", "why", ("load_cv", "dead_experts"))
    assert study().description == "" and study().metrics == ()


def test_unknown_keys_kinds_and_arm_names_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^study 's': unknown key 'zzz' \(valid: "):
        study(zzz=1)
    with pytest.raises(ConfigError, match=r"^budget.kind='steps' is not one of \['tokens', 'flops', 'time'\]$"):
        Budget(kind="steps", amount=1)
    with pytest.raises(ConfigError, match=r"^quick.budget of kind 'tokens' takes exactly one amount"):
        quick({"budget": {"kind": "tokens", "flops": 5}})
    for bad in ("a b", "", "a/b"):
        with pytest.raises(ConfigError, match="arm name"):
            study(arms=[{"name": bad}])
