"""The training run's progress display (``moekit.training.display.RunDisplay``): what each step shows, against
which budget, and where the slow-machine warning goes."""

from moekit.training.config import TrainConfig
from moekit.training.display import RunDisplay


def state(step, elapsed=0.0, cpu_time=0.0):
    return {"step": step, "elapsed": elapsed, "cpu_time": cpu_time}


def lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_a_step_budget_shows_the_step_its_fields_and_an_eta_from_the_session_start(capsys):
    tc = TrainConfig(max_steps=10)
    display = RunDisplay(tc, state(2, elapsed=100.0), show=True, check_throughput=False)
    display.step(state(4, elapsed=110.0), loss=2.34567, tokens_per_s=12345.6, load_cv=0.456)
    (line,) = lines(capsys)
    # 2 steps in 10 s this session: 6 steps to go take 30 s (the resumed run's first 100 s do not count)
    assert line.startswith(" 40% step 4/10 · ")
    assert "ETA 0:30 · loss 2.346 · tok/s 12,346 · load_cv 0.46" in line
    display.close()


def test_without_a_load_cv_the_field_is_left_out(capsys):
    display = RunDisplay(TrainConfig(max_steps=4), state(0), show=True, check_throughput=False)
    display.step(state(1, elapsed=1.0), loss=1.0, tokens_per_s=10.0, load_cv=None)
    (line,) = lines(capsys)
    assert line.endswith("loss 1.000 · tok/s 10") and "load_cv" not in line


def test_a_time_budget_that_governs_shows_time_on_its_clock(capsys):
    tc = TrainConfig(max_steps=1000, max_seconds=60.0, time_clock="cpu")
    display = RunDisplay(tc, state(0), show=True, check_throughput=False)
    # the CPU clock (30 s, half the budget) is further along than the steps (3 of 1000) and than wall time
    display.step(state(3, elapsed=5.0, cpu_time=30.0), loss=1.0, tokens_per_s=10.0, load_cv=None)
    (line,) = lines(capsys)
    assert line.startswith(" 50% time 0:30/1:00 (step 3) · ") and "ETA 0:30" in line
    wall = RunDisplay(TrainConfig(max_steps=1000, max_seconds=60.0), state(0), show=True, check_throughput=False)
    wall.step(state(3, elapsed=15.0, cpu_time=30.0), loss=1.0, tokens_per_s=10.0, load_cv=None)
    (line,) = lines(capsys)
    assert line.startswith(" 25% time 0:15/1:00 (step 3) · ")


def slow_run(display):
    for step in range(1, 7):  # the warning is due after the sixth step
        display.step(state(step, elapsed=float(step)), loss=1.0, tokens_per_s=1.0, load_cv=None)


def test_the_slow_machine_warning_goes_to_stderr_even_with_the_display_off(capsys):
    tc = TrainConfig(max_steps=100, expected_tokens_per_s=3000.0)
    slow_run(RunDisplay(tc, state(0), show=False, check_throughput=True))
    (line,) = lines(capsys)  # no progress lines, the warning only
    assert line.startswith("warning: this machine trains at 1 tokens/s per process, far below the 3,000 tokens/s")
    # 94 steps to go at 1 s a step; a step budget
    assert "About 1:34 to go; the model it trains is the same (a step budget)" in line
    timed = TrainConfig(max_steps=100, max_seconds=50.0, expected_tokens_per_s=3000.0)
    slow_run(RunDisplay(timed, state(0), show=False, check_throughput=True))
    (line,) = lines(capsys)  # the time budget ends first: 44 s to go
    assert "About 0:44 to go; under its time budget it will train fewer steps" in line
    slow_run(RunDisplay(tc, state(0), show=False, check_throughput=False))  # another rank: no check
    assert lines(capsys) == []
    slow_run(RunDisplay(tc, state(0), show=True, check_throughput=True))
    shown = lines(capsys)
    assert sum(line.startswith("warning: this machine trains at 1 tokens/s") for line in shown) == 1
    assert any(line.startswith("  1% step 1/100") for line in shown)
