"""The slow-machine warning (``moekit.training.throughput``): when, how often and what it says."""

from moekit.training.throughput import RATE_STEPS, SLOW_FACTOR, ThroughputCheck


def feed(check, rates, eta=65.0):
    return [check.add(r, eta) for r in rates]


def test_warns_once_after_the_first_steps_on_their_median_without_the_warm_up_step():
    assert RATE_STEPS == 5 and SLOW_FACTOR == 3.0
    check = ThroughputCheck(expected=300.0)
    # the first (warm-up) step is ignored: the median of the next five (50, 40, 60, 1e9, 1e9) is 60 < 300 / 3
    out = feed(check, [1.0, 50, 40, 60, 1e9, 1e9, 10, 10])
    assert out[:5] == [None] * 5 and out[6:] == [None, None]  # only after the sixth step, and once
    assert out[5] == ("warning: this machine trains at 60 tokens/s per process, far below the 300 tokens/s "
                      "this config expects (train.expected_tokens_per_s, 2 idle CPU cores): is it busy? About 1:05 to "
                      "go; the model it trains is the same (a step budget), only later. MFU is measured against a "
                      "matmul peak taken under the same load, so it does not show this.")
    # a slow warm-up step alone does not warn
    assert feed(ThroughputCheck(expected=300.0), [1.0] + [1e9] * 5)[5] is None


def test_threshold_is_a_third_of_the_expected_rate_per_process():
    at = ThroughputCheck(expected=300.0)
    assert feed(at, [0, 100, 100, 100, 100, 100])[5] is None  # exactly expected / 3: not slow
    below = ThroughputCheck(expected=300.0)
    assert feed(below, [0, 99, 99, 99, 99, 99])[5] is not None
    # two processes: 198 tokens/s of the whole run is 99 per process
    two = ThroughputCheck(expected=300.0, world_size=2)
    text = feed(two, [0] + [198] * 5)[5]
    assert text is not None and "trains at 99 tokens/s per process" in text


def test_time_budget_wording_and_no_check_without_an_expected_rate():
    timed = feed(ThroughputCheck(expected=300.0, time_budget=True), [0] + [10] * 5)[5]
    assert timed is not None and "to go; under its time budget it will train fewer steps than the preset intends. MFU" in timed
    assert feed(ThroughputCheck(expected=None), [0] + [1] * 10) == [None] * 11
