"""Per-round ratios (issue 20): the benchmarks report, beside each ratio of medians, the quartiles of the ratio
taken round by round, so a reader can tell a difference from the noise of one run. Timed here on a fake clock
that advances by programmed amounts, so every figure is known exactly."""

from __future__ import annotations

import pytest

import moekit.bench.layer as layer_module
import moekit.bench.step as step_module
from moekit.bench import timing
from moekit.bench.layer import SHAPES, Shape, bench_layer, format_table
from moekit.bench.timing import alternate, alternate_rounds, paired_ratios


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, durations):
        """A function whose k-th call takes ``durations[k]`` seconds on this clock."""
        it = iter(durations)

        def fn():
            self.now += next(it)
        return fn


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setitem(timing.CLOCKS, "wall", c)
    return c


def test_rounds_are_every_timed_call_in_order_after_the_warm_up(clock):
    fns = {"a": clock.runner([9, 1, 2, 3]), "b": clock.runner([9, 4, 5, 6])}
    assert alternate_rounds(fns, repeats=3, warmup=1) == {"a": [1, 2, 3], "b": [4, 5, 6]}


def test_alternate_is_the_median_of_the_rounds(clock):
    fns = {"a": clock.runner([5, 1, 7]), "b": clock.runner([2, 2, 8])}
    assert alternate(fns, repeats=3, warmup=0) == {"a": 5, "b": 2}


def test_paired_ratios_are_quartiles_of_the_per_round_ratios():
    rounds = {"base": [1.0, 2.0, 4.0, 1.0], "c": [2.0, 2.0, 2.0, 3.0]}  # per-round ratios 2, 1, 0.5, 3
    q = paired_ratios(rounds, "base")
    assert q["base"] == (1.0, 1.0, 1.0)
    assert q["c"] == pytest.approx((0.875, 1.5, 2.25))  # (the ratio of the medians would be 2 / 1.5 = 1.33)
    assert paired_ratios({"base": [3.0], "c": [4.5]}, "base")["c"] == (1.5, 1.5, 1.5)  # one round


def test_pairing_cancels_what_slows_a_whole_round():
    load = [1.0, 1.6, 0.7, 2.5, 1.1, 1.3]  # another process slows some rounds for both candidates alike
    rounds = {"dense": [0.2 * x for x in load], "moe": [0.26 * x for x in load]}
    q1, median, q3 = paired_ratios(rounds, "dense")["moe"]
    assert q1 == pytest.approx(1.3) and median == pytest.approx(1.3) and q3 == pytest.approx(1.3)


def test_alternate_refuses_no_rounds():
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        alternate_rounds({"a": lambda: None}, repeats=0)


def test_layer_bench_reports_the_per_round_quartiles(monkeypatch):
    monkeypatch.setitem(SHAPES, "test-s", Shape(32, 16, 4, 2, 1, 64))
    seen = []
    real = layer_module.paired_ratios

    def spy(rounds, base):
        out = real(rounds, base)
        seen.append((rounds, out))
        return out

    monkeypatch.setattr(layer_module, "paired_ratios", spy)
    result = bench_layer("test-s", repeats=3, tokens=32, engines=("sorted",))
    rows = result["results"]
    assert rows["dense-equivalent"]["train_ratio_quartiles"] == [1.0, 1.0, 1.0]
    (fwd_rounds, fwd_q), (train_rounds, train_q) = seen
    assert len(train_rounds["moekit-sorted"]) == 3
    assert rows["moekit-sorted"]["train_ratio_quartiles"] == list(train_q["moekit-sorted"])
    assert rows["moekit-sorted"]["forward_ratio_quartiles"] == list(fwd_q["moekit-sorted"])
    q = rows["moekit-sorted"]["train_ratio_quartiles"]
    assert q[0] <= q[1] <= q[2]
    table = format_table(result)
    assert f"{q[0]:.2f}-{q[2]:.2f}" in table and "q1-q3" in table


def test_compare_steps_quartiles_are_tokens_per_second_ratios(clock):
    class Fake:
        def __init__(self, tokens, durations):
            self.tokens_per_step = tokens
            self._run = clock.runner(durations)

        def __call__(self):
            self._run()

    # b does twice the tokens per step; its step takes 1.0, 3.0, 2.0 s against a's 1, 1, 1
    out = step_module.compare_steps({"a": Fake(100, [1, 1, 1, 1]), "b": Fake(200, [9, 1.0, 3.0, 2.0])},
                                    repeats=3, warmup=1)
    assert out["a"]["tokens_per_s_ratio_quartiles"] == [1.0, 1.0, 1.0]
    # per-round tokens/s ratios: 2/1, 2/3, 2/2 -> quartiles of (0.667, 1, 2)
    assert out["b"]["tokens_per_s_ratio_quartiles"] == pytest.approx([5 / 6, 1.0, 1.5])
    assert out["b"]["tokens_per_s_ratio"] == pytest.approx(1.0)  # 200 / 2 (median) vs 100 / 1


def test_alternate_defaults_to_two_warm_up_and_ten_timed_rounds_and_ticks_after_each(clock):
    calls, ticks = [], []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = alternate(fns, tick=lambda: ticks.append(len(calls)))
    assert calls == ["a", "b"] * 12  # A B A B ...
    assert ticks == [2 * (i + 1) for i in range(12)]  # after every round, warm-up rounds included
    assert out == {"a": 0.0, "b": 0.0}
    assert len(alternate_rounds(fns)["a"]) == 10
