"""The CPU-clock time budget (``train.time_clock``) and equal-CPU-time studies (issue 20).

The trainer's CPU clock is replaced by a fake one that advances exactly one second per reading, so a training
step "costs" one CPU second whatever the machine is doing: no timed assertion anywhere.
"""

import json
from datetime import timedelta
from pathlib import Path

import pytest

from moekit.cli.main import main
from moekit.compare import load_study, plan_study, run_key
from moekit.compare.plan import describe_plan
from moekit.compare.plots import mean_time_curve
from moekit.compare.runner import RunOutcome
from moekit.compare.study import study_from_dict
from moekit.configs import ConfigError
from moekit.parallel import init_from_env, run_local
from moekit.recipes import load_preset
from moekit.training import train, with_overrides
from moekit.training import trainer as trainer_mod
from moekit.training.checkpoint import read_state
from moekit.training.optim import learning_rate
from moekit.training.trainer import budget_plan, spent_budget

TINY = {"train.eval_every": 0, "train.eval_batches": 1, "train.device": "cpu", "train.checkpoint_every": 0,
        "train.checkpoint_seconds": 0, "data.max_files": 3, "train.warmup_steps": 2}


class FakeCPU:
    """A CPU clock that advances ``tick`` seconds per reading; ``burn`` adds seconds (work outside steps)."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def burn(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_cpu(monkeypatch):
    clock = FakeCPU(1.0)  # read before and after each step: one CPU second per step
    monkeypatch.setattr(trainer_mod, "_cpu_seconds", clock)
    return clock


def tiny(**overrides):
    return with_overrides(load_preset("tiny"), {**TINY, **overrides})


def test_time_clock_is_validated_and_defaults_to_wall():
    assert load_preset("tiny").train.time_clock == "wall"
    with pytest.raises(ValueError, match=r"train.time_clock='gpu' is not one of \['wall', 'cpu'\]"):
        tiny(**{"train.time_clock": "gpu"})
    with pytest.raises(ValueError, match="did you mean 'cpu'"):
        tiny(**{"train.time_clock": "cpus"})
    assert "CPU time in training steps" in budget_plan(tiny(**{"train.max_seconds": 30, "train.time_clock": "cpu"}))
    assert "of wall time" in budget_plan(tiny(**{"train.max_seconds": 30}))


def test_cpu_budget_stops_by_cpu_seconds_and_the_schedule_follows_them(tmp_path, fake_cpu):
    cfg = tiny(**{"train.max_steps": 100_000, "train.max_seconds": 5.5, "train.time_clock": "cpu"})
    result = train(cfg, tmp_path / "run", progress=False)
    # steps 1..6 each cost one fake CPU second: after 5 steps 5 < 5.5 spent, after 6 the budget is gone
    assert result.summary["step"] == 6 and result.summary["cpu_time_s"] == pytest.approx(6.0)
    assert result.summary["time_clock"] == "cpu"
    steps = [r for r in result.records if "loss" in r]
    assert [r["cpu_time"] for r in steps] == pytest.approx([1, 2, 3, 4, 5, 6])
    tc = cfg.train
    for r in steps:  # the record of step s was trained at step index s - 1 with s - 1 CPU seconds spent
        s = r["step"] - 1
        assert r["lr"] == pytest.approx(learning_rate(tc, s, s / 5.5))
    # the step fraction (6 / 100,000) would leave the cosine at its peak; the time fraction has decayed it
    assert steps[-1]["lr"] < 0.5 * learning_rate(tc, 5, 5 / 100_000)


def test_validation_does_not_count_against_a_cpu_budget(tmp_path, fake_cpu, monkeypatch):
    real_evaluate = trainer_mod.evaluate

    def costly_evaluate(*args, **kwargs):
        fake_cpu.burn(100.0)  # a validation that would spend the whole budget many times over
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "evaluate", costly_evaluate)
    cfg = tiny(**{"train.max_steps": 100_000, "train.max_seconds": 3.5, "train.time_clock": "cpu",
                  "train.eval_every": 1})
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.summary["step"] == 4 and result.summary["cpu_time_s"] == pytest.approx(4.0)
    vals = [r for r in result.records if "val_loss" in r]
    assert [r["cpu_time"] for r in vals] == pytest.approx([1, 2, 3, 4])


def test_wall_clock_budget_ignores_cpu_seconds(tmp_path, fake_cpu):
    cfg = tiny(**{"train.max_steps": 3, "train.max_seconds": 1000.0})  # time_clock wall: 3 fake CPU s spent
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.summary["step"] == 3 and result.summary["time_clock"] == "wall"
    assert result.summary["cpu_time_s"] == pytest.approx(3.0)


def test_cpu_time_survives_resume_and_a_spent_cpu_budget_names_its_override(tmp_path, fake_cpu):
    cfg = tiny(**{"train.max_steps": 100_000, "train.max_seconds": 4.5, "train.time_clock": "cpu",
                  "train.checkpoint_every": 1})
    out = tmp_path / "run"
    train(cfg, out, progress=False, until_step=2)
    assert read_state(out)["cpu_time"] == pytest.approx(2.0)
    result = train(cfg, out, resume=True, progress=False)
    assert result.summary["step"] == 5 and result.summary["cpu_time_s"] == pytest.approx(5.0)
    assert spent_budget(cfg, {"step": 5, "elapsed": 0.1, "cpu_time": 5.0}) == "--train.max_seconds=9"
    assert spent_budget(cfg, {"step": 5, "elapsed": 50.0, "cpu_time": 1.0}) is None  # wall time is not its clock
    assert spent_budget(cfg, {"step": 5, "elapsed": 50.0}) is None  # a checkpoint from before the field


def test_compare_time_budget_maps_to_the_train_fields():
    study = load_study("recipes_time")
    assert study.budget.kind == "time" and study.budget.clock == "cpu"
    assert "equal CPU time (150 CPU seconds of training steps per run)" == study.budget.describe()
    specs = plan_study(study.with_budget(50), threads=1)
    assert {s.arm for s in specs} == {"dense", "coarse-top2", "fine-shared", "mid-shared"} and len(specs) == 12
    for s in specs:
        tc = s.config.train
        assert (tc.max_seconds, tc.time_clock, tc.eval_every, tc.threads) == (50.0, "cpu", 40, 1)
        assert tc.max_steps >= 10**9 and s.planned_flops is None
    assert "50 s (CPU seconds of training steps)" in describe_plan(specs)
    mid = next(s for s in specs if s.arm == "mid-shared").config.model.moe
    assert mid is not None and (mid.num_experts, mid.hidden_dim, mid.top_k, mid.num_shared_experts) == (16, 128, 3, 1)
    wall = plan_study(study.with_budget(clock="wall"))
    assert all(s.config.train.time_clock == "wall" and s.config.train.max_seconds == 150 for s in wall)
    # the clock is part of what a run computes, so it changes the cache folder ...
    assert run_key(specs[0].config) != run_key(with_overrides(specs[0].config, {"train.time_clock": "wall"}))


def test_wall_clock_default_keeps_the_cache_keys_of_earlier_runs():
    # ... but the default one does not: folders written before train.time_clock existed are still found
    # (the hash below is the one this spec had before the field was added)
    assert plan_study(load_study("recipes", quick=True))[0].folder == "dense-seed0-7d30c3d022"


@pytest.mark.parametrize("budget, message", [
    ({"kind": "flops", "flops": 1e12, "clock": "cpu"}, "applies to time budgets only"),
    ({"kind": "time", "seconds": 10, "clock": "gpu"}, r"budget.clock='gpu' is not one of \['wall', 'cpu'\]"),
    ({"kind": "time", "seconds": 10, "clocks": "cpu"}, "optionally clock"),
])
def test_budget_clock_errors_say_how_to_fix(budget, message):
    data = {"budget": budget, "arms": [{"name": "a", "preset": "tiny"}]}
    with pytest.raises(ConfigError, match=message):
        study_from_dict(data, "s")


def test_cli_budget_clock(capsys):
    assert main(["compare", "recipes_time", "--plan", "--budget", "20", "--budget-clock", "wall"]) == 0
    out = capsys.readouterr().out
    assert "equal wall time (20 s of training per run)" in out and "20 s (wall)" in out
    assert main(["compare", "recipes", "--plan", "--budget-clock", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--budget-clock applies to time budgets only" in err and err.count("\n") == 1


def _outcome(spec, curve):
    return RunOutcome(spec, None, {"val_loss": 1.0, "val_bpb": curve[-1]["val_bpb"]}, curve)  # type: ignore[arg-type]


def test_mean_time_curve_pairs_shared_steps_and_final_points():
    spec = plan_study(load_study("recipes_time", quick=True))[0]
    a = [{"step": 10, "val_bpb": 4.0, "cpu_time": 2.0}, {"step": 20, "val_bpb": 3.0, "cpu_time": 4.0},
         {"step": 23, "val_bpb": 2.8, "cpu_time": 5.0}]
    b = [{"step": 10, "val_bpb": 4.2, "cpu_time": 2.2}, {"step": 20, "val_bpb": 3.2, "cpu_time": 4.2},
         {"step": 30, "val_bpb": 2.5, "cpu_time": 4.9}, {"step": 31, "val_bpb": 2.4, "cpu_time": 5.0}]
    xs, mean, sd = mean_time_curve([_outcome(spec, a), _outcome(spec, b)])
    assert xs == pytest.approx([2.1, 4.1, 5.0])  # step 30 is b's alone; the last point is each run's final one
    assert mean == pytest.approx([4.1, 3.1, 2.6])
    assert sd == pytest.approx([0.1414214, 0.1414214, 0.2828427])
    old = [{"step": 10, "val_bpb": 4.0}]  # a run recorded before the clocks were: left out, not guessed
    assert mean_time_curve([_outcome(spec, old)]) == ([], [], [])


@pytest.mark.slow
def test_quick_time_study_end_to_end(tmp_path):
    """The quick equal-CPU-time study in this process: table, JSON and the bits/byte-against-CPU-seconds plot."""
    assert main(["compare", "recipes_time", "--quick", "--workers", "0", "--threads", "1", "--out", str(tmp_path),
                 "--no-progress", "--budget", "0.5"]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["budget"] == {"kind": "time", "amount": 0.5, "clock": "cpu"}
    for run in record["runs"]:
        assert run["finished"] and run["summary"]["time_clock"] == "cpu"
        assert 0.5 <= run["summary"]["cpu_time_s"] < 0.5 + run["summary"]["train_time_s"]
        assert run["val_curve"][-1]["cpu_time"] == pytest.approx(run["summary"]["cpu_time_s"])
    assert (tmp_path / "val_vs_time.png").stat().st_size > 0


def _two_rank_worker(root: str) -> dict:
    """Each rank's CPU clock runs at its own rate: rank 0 one second per step, rank 1 a quarter."""
    rank = init_from_env(1, timeout=timedelta(seconds=90)).rank
    trainer_mod._cpu_seconds = FakeCPU(1.0 if rank == 0 else 0.25)  # type: ignore[attr-defined]
    cfg = tiny(**{"train.max_steps": 100_000, "train.max_seconds": 3.5, "train.time_clock": "cpu"})
    result = train(cfg, Path(root) / "run", progress=False)
    return {"step": result.summary["step"]}


def test_under_two_ranks_rank_zeros_cpu_clock_decides_for_both(tmp_path):
    ranks = run_local(_two_rank_worker, 2, str(tmp_path), timeout=240)
    # rank 1 alone would train 14 steps; rank 0's 4 CPU seconds end the run on both (else a collective hangs)
    assert [r["step"] for r in ranks] == [4, 4]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cpu_time_s"] == pytest.approx(4.0)
