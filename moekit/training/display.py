"""What a training run shows while it trains: the progress bar or lines, each step's fields, and the slow-machine
warning (:class:`~moekit.training.throughput.ThroughputCheck`)."""

from __future__ import annotations

import sys
from typing import Any

from .budget import spent_time
from .config import TrainConfig
from .metrics import Progress, budget_status, format_duration
from .throughput import ThroughputCheck

__all__ = ["RunDisplay"]


class RunDisplay:
    """The progress display of one training session (rank 0 shows it; other ranks pass ``show=False``).

    Args:
        tc: the run's training settings (step and time budgets, clock, expected tokens/s).
        state: the run's bookkeeping at the session's start (``step``, ``elapsed``, ``cpu_time``); the ETA counts
            from here, so a resumed run's earlier pace does not enter it.
        show: draw the progress display.
        check_throughput: check for a slow machine (rank 0; the warning goes to stderr even with ``show`` off).
        world_size: processes whose tokens each step's rate counts.
    """

    def __init__(self, tc: TrainConfig, state: dict[str, Any], *, show: bool, check_throughput: bool,
                 world_size: int = 1) -> None:
        self.tc, self.show = tc, show
        self.bar = Progress(tc.max_steps, state["step"], enabled=show)
        self.start = (state["step"], spent_time(tc.time_clock, state))
        self.throughput = ThroughputCheck(tc.expected_tokens_per_s if check_throughput else None, world_size,
                                          tc.max_seconds is not None)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()

    def step(self, state: dict[str, Any], loss: float, tokens_per_s: float, load_cv: float | None) -> None:
        """Show the step ``state["step"]`` just finished (its loss, tokens/s and load CV), against the budget that
        governs, and the slow-machine warning once it is due."""
        tc, step = self.tc, state["step"]
        spent = spent_time(tc.time_clock, state)
        fields = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if load_cv is not None:
            fields["load_cv"] = f"{load_cv:.2f}"
        fraction, eta, governs = budget_status(step, spent, tc.max_steps, tc.max_seconds, start_step=self.start[0],
                                               start_elapsed=self.start[1])
        label = (f"step {step:,}/{tc.max_steps:,}" if governs == "steps" else
                 f"time {format_duration(spent)}/{format_duration(tc.max_seconds)} (step {step:,})")
        self.bar.update(step, fields, force=step == tc.max_steps, fraction=fraction, eta=eta, label=label)
        warning = self.throughput.add(tokens_per_s, eta)
        if warning is not None and self.show:
            self.bar.write(warning)
        elif warning is not None:
            print(warning, file=sys.stderr, flush=True)
