"""A cache simulator: replay a trace of expert accesses under a policy, a prefetcher and a byte budget.

The ``ExpertCache`` simulator of the MoE-inference survey (spec ``compression-adaptation-serving.md`` §11),
with Read-ME's lookahead (§12) as the ``oracle`` prefetcher and Belady as the policy that knows the future.

Time model (a choice: the spec fixes only the inputs and metrics). One copy engine of ``bandwidth`` bytes/s moves
experts in the order asked; every layer computes for ``compute_seconds`` once all its experts are resident. At a
layer, misses are queued first, then the prefetcher's guesses for the next layer (the last layer's guesses are
for layer 0 of the next pass), which load while the layer computes. A layer waits (stalls) until its experts
have arrived, whether they were missed or prefetched late. Hit rate counts demand accesses that found their
expert resident or in flight.

Prefetchers: ``none``; ``router`` (the next layer's router on this layer's input, recorded in the trace);
``affinity`` (a table of profiled layer-to-layer transitions, :func:`~moekit.serving.trace.affinity_table`);
``oracle`` (the true next layer: a perfect predictor, what a pre-gating plan gives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .cache import POLICIES, ExpertCache, Key, make_policy
from .trace import Trace, affinity_table

__all__ = ["SIM_PREFETCHERS", "SimResult", "simulate", "sweep"]

SIM_PREFETCHERS = ("none", "router", "affinity", "oracle")


@dataclass(frozen=True)
class SimResult:
    policy: str
    prefetcher: str
    capacity_bytes: int
    accesses: int
    hits: int
    hit_rate: float
    hit_rate_after_warmup: float  # accesses after each expert's first use
    bytes_moved: int
    stall_seconds: float
    stalls: int  # layers that waited
    total_seconds: float
    prefetch_recall: float  # predicted ∩ used / used, over the layers the prefetcher predicts

    def as_dict(self) -> dict:
        return asdict(self)


def _next(trace: Trace, t: int, layer: int) -> tuple[int, int]:
    """The (pass, layer) that runs after layer ``layer`` of pass ``t``."""
    return (t, layer + 1) if layer + 1 < trace.num_layers else (t + 1, 0)


def _predict(trace: Trace, prefetcher: str, table: dict[Key, list[int]], t: int, layer: int) -> list[Key]:
    steps = trace.steps
    nt, nl = _next(trace, t, layer)
    if prefetcher == "none" or nt >= len(steps):
        return []
    if prefetcher == "oracle":
        return [(nl, e) for e in steps[nt][nl]["experts"]]
    if nl == 0:
        return []  # router and affinity predict within a pass
    if prefetcher == "router":
        return [(nl, e) for e in steps[t][layer]["predicted"]]
    return [(nl, f) for f in sorted({f for e in steps[t][layer]["experts"] for f in table.get((layer, e), [])})]


def simulate(trace: Trace, policy: str, prefetcher: str, capacity_bytes: int, *, bandwidth: float = 25e9,
             compute_seconds: float = 1e-4, affinity: dict[Key, list[int]] | None = None,
             prior: dict[Key, float] | None = None) -> SimResult:
    """Replay ``trace`` (see the module docstring for the time model); ``prior`` feeds the activation policy."""
    if prefetcher not in SIM_PREFETCHERS:
        raise ValueError(f"unknown prefetcher {prefetcher!r}; choose one of {', '.join(SIM_PREFETCHERS)}")
    if capacity_bytes < max(trace.expert_bytes, default=0):
        raise ValueError(f"capacity {capacity_bytes} bytes is smaller than one expert ({max(trace.expert_bytes)} "
                         f"bytes); raise the budget")
    if bandwidth <= 0 or compute_seconds < 0:
        raise ValueError(f"bandwidth={bandwidth} must be > 0 and compute_seconds={compute_seconds} >= 0")
    future = trace.accesses()
    nbytes = trace.expert_bytes
    cache = ExpertCache(capacity_bytes, make_policy(policy, num_layers=trace.num_layers, future=future, prior=prior,
                                                    num_experts=max(trace.num_experts, default=1)),
                        lambda k: {}, lambda k: nbytes[k[0]])
    table = affinity if affinity is not None else (affinity_table(trace) if prefetcher == "affinity" else {})
    now = io_free = stall = 0.0
    ready: dict[Key, float] = {}
    seen: set[Key] = set()
    warm_hits = warm_total = stalls = 0
    recall_hit = recall_total = 0
    predicted_for: dict[tuple[int, int], set[int]] = {}

    def load(key: Key) -> None:
        nonlocal io_free
        start = max(now, io_free)
        io_free = start + nbytes[key[0]] / bandwidth
        ready[key] = io_free

    for t, step in enumerate(trace.steps):
        for layer, entry in enumerate(step):
            keys = [(layer, e) for e in entry["experts"]]
            if (t, layer) in predicted_for:
                recall_hit += len(predicted_for[(t, layer)] & set(entry["experts"]))
                recall_total += len(entry["experts"])
            cache.pinned = set(keys)
            for key in keys:
                hit = key in cache.resident
                if key in seen:
                    warm_total += 1
                    warm_hits += hit
                seen.add(key)
                cache.get(key)
                if not hit:
                    load(key)
            arrive = max([now] + [ready.get(k, 0.0) for k in keys])
            if arrive > now:
                stall, stalls, now = stall + arrive - now, stalls + 1, arrive
            guesses = _predict(trace, prefetcher, table, t, layer)
            if prefetcher != "none" and guesses:
                predicted_for[_next(trace, t, layer)] = {e for _, e in guesses}
            cache.pinned |= set(guesses)  # a prefetch never evicts what this layer or the guess itself needs
            for key in guesses:
                if key not in cache.resident:
                    cache.prefetch(key)
                    if key in cache.resident:
                        load(key)
            cache.pinned = set()
            now += compute_seconds
    s = cache.stats
    return SimResult(policy, prefetcher, capacity_bytes, s.hits + s.misses, s.hits, s.hit_rate,
                     warm_hits / warm_total if warm_total else 1.0, s.bytes_moved, stall, stalls, now,
                     recall_hit / recall_total if recall_total else 0.0)


def sweep(trace: Trace, budgets: Sequence[int], policies: Sequence[str] = POLICIES,
          prefetchers: Sequence[str] = SIM_PREFETCHERS, **kwargs) -> list[SimResult]:
    """:func:`simulate` for every budget × policy × prefetcher (the affinity table is profiled once)."""
    table = affinity_table(trace)
    return [simulate(trace, p, f, b, affinity=table, **kwargs) for b in budgets for p in policies for f in prefetchers]
