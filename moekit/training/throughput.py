"""The slow-machine warning: after a session's first few steps, compare the measured tokens/s with the
config's ``train.expected_tokens_per_s`` (measured on 2 idle CPU cores) and warn once when it is far below."""

from __future__ import annotations

import statistics

from .metrics import format_duration

__all__ = ["SLOW_FACTOR", "ThroughputCheck"]

SLOW_FACTOR = 3.0  # warn when the measured tokens/s is below expected_tokens_per_s / SLOW_FACTOR
RATE_STEPS = 5  # steps (after the first, which warms up) whose median rate checks the throughput


class ThroughputCheck:
    """Collects each step's tokens/s (of all processes); :meth:`add` returns the warning once, else ``None``.

    Args:
        expected: ``train.expected_tokens_per_s`` per process, or ``None`` (no check).
        world_size: processes whose tokens the rates count.
        time_budget: whether the run has a time budget (it then trains fewer steps on a slow machine).
    """

    def __init__(self, expected: float | None, world_size: int = 1, time_budget: bool = False) -> None:
        self.expected, self.world_size, self.time_budget = expected, world_size, time_budget
        self.rates: list[float] = []

    def add(self, tokens_per_s: float, eta: float | None) -> str | None:
        self.rates.append(tokens_per_s)
        if len(self.rates) != RATE_STEPS + 1 or not self.expected:
            return None
        measured = statistics.median(self.rates[1:]) / self.world_size  # the first step warms up
        if measured >= self.expected / SLOW_FACTOR:
            return None
        budget = ("under its time budget it will train fewer steps than the preset intends" if self.time_budget
                  else "the model it trains is the same (a step budget), only later")
        return (f"warning: this machine trains at {measured:,.0f} tokens/s per process, far below the "
                f"{self.expected:,.0f} tokens/s this config expects (train.expected_tokens_per_s, 2 idle CPU cores): "
                f"is it busy? About {format_duration(eta)} to go; {budget}. MFU is measured against a matmul "
                f"peak taken under the same load, so it does not show this.")
