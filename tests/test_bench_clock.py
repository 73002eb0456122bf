"""The benchmarks' CPU clock (issue 20): CPU seconds ignore the time a process waits, so ratios measured on a
shared machine stop depending on the other processes; it refuses what it cannot time."""

from __future__ import annotations

import json
import time

import pytest

from moekit.bench.layer import SHAPES, Shape, bench_layer
from moekit.bench.timing import alternate
from moekit.cli.main import main


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_clock_counts_work_and_not_waiting():
    fns = {"sleep": lambda: time.sleep(0.05), "work": lambda: _busy(0.02)}
    wall = alternate(fns, repeats=3, warmup=0, clock="wall")
    cpu = alternate(fns, repeats=3, warmup=0, clock="cpu")
    assert wall["sleep"] >= 0.05 and cpu["sleep"] < 0.01  # waiting costs wall time, not CPU time
    assert 0.02 <= cpu["work"] < 0.04


def test_clock_refusals_name_the_fix():
    with pytest.raises(ValueError, match=r"clock must be one of \['cpu', 'wall'\], got 'gpu'"):
        alternate({"a": lambda: None}, repeats=1, clock="gpu")
    with pytest.raises(ValueError, match="cannot time work on cuda; use clock='wall'"):
        alternate({"a": lambda: None}, repeats=1, device="cuda", clock="cpu")


def test_bench_records_clock_and_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(SHAPES, "test-s", Shape(32, 16, 4, 2, 1, 64))
    result = bench_layer("test-s", repeats=1, tokens=32, engines=("sorted", "sorted_blocked"), clock="cpu")
    assert result["clock"] == "cpu"
    env = result["environment"]
    assert env["torch"] and env["date_utc"].startswith("20") and len(env["load_average"]) == 3
    assert result["results"]["moekit-sorted_blocked"]["train_ratio"] > 0
    out = tmp_path / "b.json"
    assert main(["bench", "--quick", "--tokens", "32", "--repeats", "1", "--clock", "cpu", "--threads", "1",
                 "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["clock"] == "cpu"
    assert "clock=cpu" in capsys.readouterr().out


def test_bench_cli_refuses_an_unknown_clock(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--clock", "sundial"])
    assert exc.value.code == 2
    assert "--clock" in capsys.readouterr().err


@pytest.mark.parametrize("engine,says", [("trition", "did you mean 'triton'"), ("grouped_mm", "grouped_mm"),
                                         ("triton", "TRITON_INTERPRET=1")])
def test_bench_cli_refuses_an_engine_it_cannot_time(capsys, monkeypatch, engine, says):
    """An unknown engine, or one that cannot run on the device, is refused before any timing (exit 2)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if engine == "triton":  # refused for the device even where Triton is not installed (then: "not installed")
        from moekit.dispatch import fused_triton
        monkeypatch.setattr(fused_triton, "_triton_installed", lambda: True)
    assert main(["bench", "--quick", "--engines", "sorted", engine, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--engines" in err and says in err



def test_bench_engine_check_lets_auto_through():
    """``auto`` is one of the layer's engine choices, so the check accepts it (and still refuses a typo)."""
    import torch

    from moekit.cli.bench import _check_engines
    from moekit.cli.main import UsageError

    assert _check_engines(("auto", "sorted", "sorted_blocked"), "cpu", torch.float32) is None
    with pytest.raises(UsageError, match="did you mean 'sorted'"):
        _check_engines(("auto", "sortd"), "cpu", torch.float32)


@pytest.mark.parametrize("load,clock,device,warned", [
    (2.0, "wall", "cpu", True), (7.5, "wall", "cpu", True), (1.99, "wall", "cpu", False),
    (5.0, "cpu", "cpu", False), (5.0, "wall", "cuda", False)])
def test_a_busy_machine_gets_a_note_about_wall_clock_noise(monkeypatch, load, clock, device, warned):
    import os

    from moekit.cli.bench import busy_machine_note

    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    note = busy_machine_note(clock, device == "cuda")
    if warned:
        assert note == (f"note: load average {load:.1f} on 2 cores: other processes share this CPU, so wall-clock "
                        "ratios move between runs (compare with the q1-q3 column); --clock cpu --threads 1 is steadier")
    else:
        assert note is None


def test_bench_prints_the_busy_note_on_stderr(monkeypatch, capsys):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert main(["bench", "--quick", "--tokens", "32", "--repeats", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "note: load average 9.0" in captured.err and "note:" not in captured.out
