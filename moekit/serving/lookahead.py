"""Read-ME's system side (spec ``compression-adaptation-serving.md`` §12): expert-aware batching.

When routing is known before the backbone runs (a pre-gating planner, :mod:`moekit.layers.variants.readme`),
the requests of a decode step can be grouped so that each batch needs few distinct experts: fewer experts to
load per batch. Lookahead caching, the other half, is :class:`~moekit.serving.cache.BeladyPolicy` fed with the
plan's future accesses, and the simulator's ``oracle`` prefetcher.

*Choice made* (the paper's batching rule is not in the spec): a greedy grouping — each batch starts with the
oldest waiting request and adds, up to ``max_batch``, the request that adds the fewest new experts (ties: the
oldest). Greedy grouping can lose to arrival order on unlucky inputs, so the arrival-order batches are kept
whenever they need no more expert loads: batching never increases the experts loaded per step.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["expert_aware_batches", "expert_loads"]


def expert_loads(batches: Sequence[Sequence[int]], experts: Sequence[Collection[int]]) -> int:
    """Sum over batches of the distinct experts the batch's requests need."""
    return sum(len(set().union(*(experts[r] for r in batch))) for batch in batches if batch)


def expert_aware_batches(experts: Sequence[Collection[int]], max_batch: int) -> list[list[int]]:
    """Request indices grouped into batches of at most ``max_batch`` (see the module docstring).

    Args:
        experts: per waiting request (in arrival order), the experts its next step needs.
        max_batch: the largest batch.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be at least 1")
    n = len(experts)
    fifo = [list(range(i, min(i + max_batch, n))) for i in range(0, n, max_batch)]
    waiting = list(range(n))
    grouped: list[list[int]] = []
    while waiting:
        batch = [waiting.pop(0)]
        union = set(experts[batch[0]])
        while waiting and len(batch) < max_batch:
            best = min(waiting, key=lambda r: (len(set(experts[r]) - union), r))
            waiting.remove(best)
            batch.append(best)
            union |= set(experts[best])
        grouped.append(batch)
    return grouped if expert_loads(grouped, experts) <= expert_loads(fifo, experts) else fifo
