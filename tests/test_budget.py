"""The budget plan line and the spent-budget bookkeeping (``moekit.training.budget``), to the character."""

from moekit.recipes import load_preset
from moekit.training import with_overrides
from moekit.training.budget import budget_plan, spent_budget, spent_time


def cfg(**overrides):
    # 3 sequences x 2 accumulation steps x 16 tokens = 96 tokens per step and process
    base = {"train.batch_size": 3, "train.grad_accum": 2, "model.context": 16, "train.max_steps": 10,
            "train.expected_tokens_per_s": "none"}
    return with_overrides(load_preset("tiny"), {k: str(v) for k, v in {**base, **overrides}.items()})


def test_plan_counts_every_factor_of_the_tokens_per_step():
    assert budget_plan(cfg()) == "budget: 10 steps x 96 tokens = 960 tokens"
    assert budget_plan(cfg(), world_size=2) == "budget: 10 steps x 192 tokens = 1,920 tokens"


def test_plan_names_the_time_budget_and_its_clock():
    tail = " if that comes first (a time budget: how far the run gets depends on the machine's load)"
    assert budget_plan(cfg(**{"train.max_seconds": 75})) == (
        "budget: 10 steps x 96 tokens = 960 tokens, or 1:15 of wall time" + tail)
    assert budget_plan(cfg(**{"train.max_seconds": 75, "train.time_clock": "cpu"})) == (
        "budget: 10 steps x 96 tokens = 960 tokens, or 1:15 of this process's CPU time in training steps "
        "(train.time_clock=cpu)" + tail)


def test_plan_expected_duration_is_the_sooner_budget_over_all_processes():
    expected = ("; expected duration about {} at 64 tokens/s (train.expected_tokens_per_s, 2 idle CPU cores), "
                "plus validation")
    # 10 steps x 192 tokens over 2 processes at 64 tokens/s each: 15 s
    two = budget_plan(cfg(**{"train.expected_tokens_per_s": 64}), world_size=2)
    assert two == "budget: 10 steps x 192 tokens = 1,920 tokens" + expected.format("0:15")
    # one process: 960 tokens at 64 tokens/s = 15 s too; a 12 s time budget comes first, a 20 s one does not
    capped = budget_plan(cfg(**{"train.expected_tokens_per_s": 64, "train.max_seconds": 12}))
    assert capped.endswith(expected.format("0:12")) and ", or 0:12 of wall time" in capped
    assert budget_plan(cfg(**{"train.expected_tokens_per_s": 64, "train.max_seconds": 20})).endswith(
        expected.format("0:15"))


def test_spent_budget_at_the_boundaries():
    c = cfg()
    assert spent_budget(c, {"step": 9}) is None
    assert spent_budget(c, {"step": 10}) == "--train.max_steps=20"
    timed = cfg(**{"train.max_steps": 1000, "train.max_seconds": 30})
    assert spent_budget(timed, {"step": 5, "elapsed": 29.9, "cpu_time": 99.0}) is None  # wall is its clock
    assert spent_budget(timed, {"step": 5, "elapsed": 30.0, "cpu_time": 0.0}) == "--train.max_seconds=60"
    cpu = cfg(**{"train.max_steps": 1000, "train.max_seconds": 30, "train.time_clock": "cpu"})
    assert spent_budget(cpu, {"step": 5, "elapsed": 99.0, "cpu_time": 30.0}) == "--train.max_seconds=60"


def test_spent_time_reads_the_clocks_field_and_zero_when_missing():
    state = {"elapsed": 12.5, "cpu_time": 7.25}
    assert spent_time("wall", state) == 12.5 and spent_time("cpu", state) == 7.25
    assert spent_time("wall", {}) == 0.0 and spent_time("cpu", {"elapsed": 3.0}) == 0.0
