"""The first hour: step budgets, duration estimate, slow-machine warning, progress with ETA, spent runs."""

import io
import json

import pytest

from moekit.training.checkpoint import read_state

from moekit.cli.main import main
from moekit.recipes import list_presets, load_preset
from moekit.training import with_overrides
from moekit.training.metrics import Progress, budget_status, format_duration
from moekit.training.trainer import budget_plan, spent_budget

TINY = ["--preset", "tiny", "--train.eval_every=0", "--train.eval_batches=1"]


def test_every_preset_trains_for_a_step_budget():
    for name, _ in list_presets():
        assert load_preset(name).train.max_seconds is None, name  # the same model on any machine
    default = load_preset("default")
    assert default.train.max_steps == 256 and default.train.expected_tokens_per_s == 4050.0
    # 256 steps x 16 x 256 tokens at 4,050 tokens/s = 259 s: the README's main job stays under 5 minutes
    assert "1,048,576 tokens" in budget_plan(default) and "about 4:19" in budget_plan(default)
    timed = with_overrides(default, {"train.max_seconds": "60"})
    assert "about 1:00" in budget_plan(timed) and "time budget" in budget_plan(timed)
    assert "expected" not in budget_plan(with_overrides(default, {"train.expected_tokens_per_s": "none"}))


def test_budget_status_follows_the_governing_budget():
    assert format_duration(3725) == "1:02:05" and format_duration(75.4) == "1:15" and format_duration(None) == "?"
    # steps: 10 of 100 done in 20 s -> 90 steps at 2 s each
    assert budget_status(10, 20.0, 100, None) == (0.1, 180.0, "steps")
    assert budget_status(0, 0.0, 100, None) == (0.0, None, "steps")  # no rate yet
    # a 240 s budget with an unbounded step count: 2 steps in 10 s is 1/24 of the run, 230 s to go
    assert budget_status(2, 10.0, 100_000, 240.0) == (10 / 240, 230.0, "time")
    # both budgets: the steps run out first (20 s to go) although the time budget is further from done
    fraction, eta, governs = budget_status(90, 180.0, 100, 1000.0)
    assert (fraction, eta, governs) == (0.9, 20.0, "steps")
    # a resumed session measures its own pace: 10 steps in the last 5 s -> 0.5 s/step
    assert budget_status(60, 105.0, 100, None, start_step=50, start_elapsed=100.0)[1] == 20.0


def test_progress_lines_in_logs_carry_an_eta():
    stream = io.StringIO()  # not a terminal: printed lines instead of a bar
    bar = Progress(50, 0, unit="run", stream=stream, every_s=0.0)
    bar.update(0)
    bar.update(10, {"loss": "1.0"})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("  0% run 0/50") and "ETA ?" in lines[0]
    assert lines[1].startswith(" 20% run 10/50") and "ETA 0:00" in lines[1] and "loss 1.0" in lines[1]
    quiet = Progress(50, 0, stream=stream, every_s=1e9)
    quiet.update(1)
    quiet.update(2)  # too soon after the last line
    assert len(stream.getvalue().splitlines()) == 3


def test_time_budget_progress_counts_time_not_steps(tmp_path, capsys):
    out = tmp_path / "timed"
    assert main(["train", *TINY, "--out", str(out), "--train.max_steps=100000", "--train.max_seconds=2"]) == 0
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if "ETA" in line]
    assert progress and all("time 0:0" in line and "/0:02" in line for line in progress), err
    assert "100,000" not in "".join(progress)
    assert "time budget" in err  # the up-front plan says the outcome depends on the machine


def test_step_budget_progress_and_estimate(tmp_path, capsys):
    out = tmp_path / "steps"
    assert main(["train", *TINY, "--out", str(out), "--train.max_steps=7",
                 "--train.expected_tokens_per_s=1e12"]) == 0
    err = capsys.readouterr().err
    assert "budget: 7 steps x 128 tokens = 896 tokens; expected duration about 0:00" in err
    last = [line for line in err.splitlines() if "ETA" in line][-1]
    assert last.startswith("100% step 7/7") and "ETA 0:00" in last
    assert "warning: this machine trains at" in err and "far below the 1,000,000,000,000 tokens/s" in err


def test_no_slow_warning_when_fast_enough_or_unknown(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "a"), "--train.max_steps=7",
                 "--train.expected_tokens_per_s=1", "--no-progress"]) == 0
    assert main(["train", *TINY, "--out", str(tmp_path / "b"), "--train.max_steps=7", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_resuming_a_spent_run_says_so_and_a_larger_budget_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--train.max_steps=3", "--no-progress"]) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "finished" in err and "step 3" in err and f"--resume --out {out} --train.max_steps=6" in err
    assert read_state(out)["step"] == 3 and (out / "metrics.jsonl").read_text() == before
    assert main(["train", "--resume", "--out", str(out), "--train.max_steps=6", "--no-progress"]) == 0
    assert read_state(out)["step"] == 6
    assert json.loads((out / "summary.json").read_text())["step"] == 6


def test_spent_budget_names_the_override():
    cfg = load_preset("tiny")
    assert spent_budget(cfg, {"step": 39}) is None
    assert spent_budget(cfg, {"step": 40}) == "--train.max_steps=80"
    timed = with_overrides(cfg, {"train.max_seconds": "30"})
    assert spent_budget(timed, {"step": 5, "elapsed": 31.0}) == "--train.max_seconds=60"


def test_expected_tokens_per_s_is_validated():
    with pytest.raises(ValueError, match="train.expected_tokens_per_s=-1"):
        with_overrides(load_preset("tiny"), {"train.expected_tokens_per_s": "-1"})


def test_tensorboard_scalars_for_training_and_routing(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--tensorboard",
                 "--train.max_steps=4", "--train.eval_every=2", "--train.eval_batches=1", "--train.log_every=2"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/load_cv", "val/val_bpb",
            "routing/layers.0.ffn/load_cv", "routing/layers.1.ffn/dead_experts"} <= tags
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == losses
    assert [e.step for e in events.Scalars("val/val_bpb")] == [2, 4]


def test_summary_table_compares_tokens_per_s_with_the_expectation():
    from moekit.training.metrics import summary_table
    table = summary_table({"tokens_per_s": 103.4, "expected_tokens_per_s": 4500.0, "mfu": 0.6})
    assert "tokens/s" in table and "103.4 (expected 4,500 on 2 idle CPU cores)" in table
    assert "expected" not in summary_table({"tokens_per_s": 103.4})
