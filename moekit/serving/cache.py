"""Expert cache policies and a byte-budgeted cache of experts, shared by live offloading and the simulator.

An expert is named by a key ``(layer, expert)``: ``layer`` counts the offloaded MoE layers in depth order,
``expert`` is the routed expert's index. The cache holds whole experts (all their projection matrices).

Policies (the expert-offloading part of the MoE-inference survey, spec ``compression-adaptation-serving.md`` §11):

- ``lru``: evict the least recently used expert (Mixtral-offloading's cache).
- ``lfu``: evict the expert used least often since the cache was built (ties: least recently used).
- ``activation``: MoE-Infinity style, activation-aware. Each expert's score is its activation count in the
  current request (reset by :meth:`Policy.new_request`) plus a prior activation frequency profiled from earlier
  traffic (optional). *Choice made* (the spec gives no formula): ties break towards evicting the expert whose
  layer comes furthest ahead in the layer cycle (so experts of the next layers stay), then least recent.
- ``reuse``: a live approximation of Belady: the expected distance to the next use, from the layer order of
  decoding and each expert's estimated probability of use (:class:`ReusePolicy`).
- ``belady``: Belady's optimum (MIN): evict the resident expert whose next use lies furthest in the future.
  It needs the future: an offline trace, or the plan of a pre-gating router (Read-ME lookahead caching, §12).

Every policy sees the same events (``access``, ``insert``, ``evict``) and picks a victim among the resident
experts that are not protected (those the running layer still needs).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .background import BackgroundLoader

__all__ = [
    "POLICIES",
    "ActivationAwarePolicy",
    "BeladyPolicy",
    "ReusePolicy",
    "CacheStats",
    "ExpertCache",
    "Key",
    "LFUPolicy",
    "LRUPolicy",
    "Policy",
    "make_policy",
]

Key = tuple[int, int]  # (offloaded layer index, expert index)


class Policy:
    """Eviction policy: told about accesses, insertions and evictions; picks victims."""

    name = "base"

    def __init__(self) -> None:
        self.clock = 0  # demand accesses seen so far
        self.last_use: dict[Key, int] = {}

    def access(self, key: Key) -> None:
        self.last_use[key] = self.clock
        self.clock += 1

    def insert(self, key: Key) -> None:
        self.last_use.setdefault(key, self.clock - 1)

    def evict(self, key: Key) -> None:
        pass

    def new_request(self) -> None:
        pass

    def score(self, key: Key) -> tuple:
        """Lower is evicted first."""
        return (self.last_use.get(key, -1),)

    def victim(self, resident: Iterable[Key]) -> Key:
        return min(resident, key=self.score)


class LRUPolicy(Policy):
    name = "lru"


class LFUPolicy(Policy):
    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = defaultdict(int)

    def access(self, key: Key) -> None:
        super().access(key)
        self.count[key] += 1

    def score(self, key: Key) -> tuple:
        return (self.count.get(key, 0), self.last_use.get(key, -1))


class ActivationAwarePolicy(Policy):
    """MoE-Infinity style: per-request activation counts plus a profiled prior (see the module docstring).

    Args:
        num_layers: offloaded layers (for the layer-distance tie break).
        prior: ``{key: activation frequency}`` profiled from earlier traffic (e.g. a trace); optional.
    """

    name = "activation"

    def __init__(self, num_layers: int = 1, prior: dict[Key, float] | None = None) -> None:
        super().__init__()
        self.num_layers = max(1, num_layers)
        self.prior = dict(prior or {})
        self.request_count: dict[Key, int] = defaultdict(int)
        self.current_layer = 0

    def access(self, key: Key) -> None:
        super().access(key)
        self.request_count[key] += 1
        self.current_layer = key[0]

    def new_request(self) -> None:
        self.request_count.clear()

    def score(self, key: Key) -> tuple:
        ahead = (key[0] - self.current_layer) % self.num_layers  # 0: this layer, L-1: just run
        return (self.request_count.get(key, 0) + self.prior.get(key, 0.0), -ahead, self.last_use.get(key, -1))


class ReusePolicy(Policy):
    """A live approximation of Belady: evict the expert whose *expected* next use lies furthest ahead.

    Decoding visits the layers in a cycle, so an expert of layer ``l`` can next be used ``ahead`` layers from now
    (1 for the next layer, ``L`` for the layer that is running or just ran) and, if it is not used then, whole
    cycles later. With ``p`` its estimated probability of use per visit of its layer (its activation count over
    the layer's visits, smoothed towards a profiled prior, or towards ``top_k / E`` equivalents of 1 / E), the
    expected distance is ``ahead + L · (1 − p) / p`` layers (a geometric number of missed cycles). *Our design*
    (the spec names only LRU/LFU/activation-aware and Belady): MoE-Infinity's activation counts turned into a
    reuse distance, so that the layer order of decoding enters the choice as it does for Belady.

    Args:
        num_layers: offloaded layers ``L``.
        num_experts: experts per layer (for the uninformed estimate ``1 / E``).
        prior: ``{key: probability of use per visit}`` profiled from earlier traffic; optional.
        strength: pseudo-visits the prior (or ``1 / E``) counts for.
        decay: each visit of a layer multiplies its experts' counts and its visit count by ``decay`` first, so
            that recent tokens weigh more (consecutive tokens of a text reuse experts); 1 keeps every visit.
            *Choice made*: 0.5, the best of {1, 0.9, 0.7, 0.5, 0.3} in the simulator on held-out text of a trained
            run (``benchmarks/bench_serving_trained.py``; 1 was 1–19 points worse than LRU there).
    """

    name = "reuse"

    def __init__(self, num_layers: int = 1, num_experts: int = 8, prior: dict[Key, float] | None = None,
                 strength: float = 4.0, decay: float = 0.5) -> None:
        super().__init__()
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay} must be in (0, 1]; 1 counts every visit equally")
        self.num_layers, self.num_experts, self.strength = max(1, num_layers), max(1, num_experts), strength
        self.decay = decay
        self.count: dict[Key, float] = defaultdict(float)
        self.visits: dict[int, float] = defaultdict(float)
        self.by_layer: dict[int, set[Key]] = defaultdict(set)
        self.prior = dict(prior or {})
        self.current_layer = -1

    def access(self, key: Key) -> None:
        super().access(key)
        if key[0] != self.current_layer:
            if self.decay < 1:
                for k in self.by_layer[key[0]]:
                    self.count[k] *= self.decay
            self.visits[key[0]] = self.visits[key[0]] * self.decay + 1
            self.current_layer = key[0]
        self.by_layer[key[0]].add(key)
        self.count[key] += 1

    def expected_distance(self, key: Key) -> float:
        layer = key[0]
        ahead = (layer - self.current_layer - 1) % self.num_layers + 1
        p0 = self.prior.get(key, 1.0 / self.num_experts)
        p = (self.count.get(key, 0) + self.strength * p0) / (self.visits.get(layer, 0) + self.strength)
        p = min(max(p, 1e-6), 1.0)
        return ahead + self.num_layers * (1.0 - p) / p

    def score(self, key: Key) -> tuple:
        # ties (equally likely experts of one layer) evict the most recent: the engine runs a layer's experts in
        # ascending order, so the one used last is, in a loop, the one needed last (as Belady would choose)
        return (-self.expected_distance(key), -self.last_use.get(key, -1))


class BeladyPolicy(Policy):
    """Belady's MIN over a known future of demand accesses ``future[i]`` (the i-th access, 0-based).

    The cache's demand accesses must follow ``future`` in order; a mismatch raises, since the optimum then no
    longer holds.
    """

    name = "belady"

    def __init__(self, future: Sequence[Key]) -> None:
        super().__init__()
        self.future: list[Key] = [(int(k[0]), int(k[1])) for k in future]
        self._uses: dict[Key, list[int]] = defaultdict(list)
        for i in range(len(self.future) - 1, -1, -1):
            self._uses[self.future[i]].append(i)  # reversed positions: the next use is the last element

    def access(self, key: Key) -> None:
        if self.clock >= len(self.future) or self.future[self.clock] != key:
            raise ValueError(f"access {self.clock} is {key}, but the known future says "
                             f"{self.future[self.clock] if self.clock < len(self.future) else 'nothing'}; "
                             f"Belady needs the exact access sequence (replay the trace it was built from)")
        self._uses[key].pop()
        super().access(key)

    def next_use(self, key: Key) -> float:
        uses = self._uses.get(key)
        return uses[-1] if uses else math.inf

    def score(self, key: Key) -> tuple:
        return (-self.next_use(key), self.last_use.get(key, -1))


POLICIES = ("lru", "lfu", "activation", "reuse", "belady")


def make_policy(name: str, *, num_layers: int = 1, future: Sequence[Key] | None = None,
                prior: dict[Key, float] | None = None, num_experts: int = 8) -> Policy:
    """A fresh policy by name; ``belady`` needs ``future``."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "activation":
        return ActivationAwarePolicy(num_layers, prior)
    if name == "reuse":
        return ReusePolicy(num_layers, num_experts, prior)
    if name == "belady":
        if future is None:
            raise ValueError("policy 'belady' needs the future accesses (a trace or a pre-gating plan); use "
                             "lru, lfu or activation for live serving")
        return BeladyPolicy(future)
    raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")


class CacheStats:
    """Counters of a cache: demand hits and misses, bytes moved, seconds spent loading."""

    def __init__(self) -> None:
        self.hits = self.misses = self.prefetches = self.prefetch_hits = 0
        self.bytes_moved = 0
        self.load_seconds = 0.0  # spent loading on the caller's thread (issuing, for background prefetches)
        self.wait_seconds = 0.0  # spent waiting for background prefetches that had not arrived

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate,
                "prefetches": self.prefetches, "prefetch_hits": self.prefetch_hits,
                "bytes_moved": self.bytes_moved, "load_seconds": self.load_seconds, "wait_seconds": self.wait_seconds}


Weights = dict[str, torch.Tensor]


class ExpertCache:
    """Experts resident under a byte budget; misses load through ``loader(key) -> {name: tensor}``.

    Args:
        capacity_bytes: the budget for resident experts.
        policy: a :class:`Policy` (which expert to evict).
        loader: reads one expert's weights (e.g. from a memory-mapped safetensors file).
        nbytes: bytes of one expert, ``nbytes(key)``.
        background: a :class:`~moekit.serving.background.BackgroundLoader`: prefetches are copied on its thread
            (the eviction that makes room still happens when the prefetch is issued); demand loads stay inline.
    """

    def __init__(self, capacity_bytes: int, policy: Policy, loader: Callable[[Key], Weights],
                 nbytes: Callable[[Key], int], background: BackgroundLoader | None = None) -> None:
        self.capacity_bytes, self.policy, self.loader, self.nbytes = capacity_bytes, policy, loader, nbytes
        self.background = background
        self.pending: dict[Key, Future] = {}  # prefetches still being copied in the background
        self.resident: dict[Key, Weights] = {}
        self.used_bytes = 0
        self.prefetched: set[Key] = set()  # loaded ahead and not yet used
        self.pinned: set[Key] = set()  # experts the running layer still needs: never evicted by a prefetch
        self.stats = CacheStats()

    def _make_room(self, size: int, protect: Key, prefetching: bool = False) -> bool:
        while self.used_bytes + size > self.capacity_bytes:
            candidates = [k for k in self.resident if k != protect and not (prefetching and k in self.pinned)]
            if not candidates:
                return False
            victim = self.policy.victim(candidates)
            del self.resident[victim]
            dropped = self.pending.pop(victim, None)
            if dropped is not None:
                dropped.cancel()
            self.prefetched.discard(victim)
            self.used_bytes -= self.nbytes(victim)
            self.policy.evict(victim)
        return True

    def _load(self, key: Key, prefetching: bool = False) -> Weights | None:
        size = self.nbytes(key)
        if size > self.capacity_bytes:
            raise ValueError(f"expert {key} needs {size} bytes but the expert budget is {self.capacity_bytes}; "
                             f"raise --expert-memory to at least one expert")
        if not self._make_room(size, key, prefetching):
            return None  # a prefetch that would evict what the running layer needs is dropped
        start = time.perf_counter()
        if prefetching and self.background is not None:
            self.pending[key] = self.background.submit(key)
            weights: Weights = {}  # filled in when a demand access waits for it
        else:
            weights = self.loader(key)
        self.stats.load_seconds += time.perf_counter() - start
        self.stats.bytes_moved += size
        self.resident[key] = weights
        self.used_bytes += size
        self.policy.insert(key)
        return weights

    def get(self, key: Key) -> Weights:
        """The expert's weights (a demand access: counted as a hit or a miss)."""
        weights = self.resident.get(key)
        if weights is None:
            self.stats.misses += 1
            weights = self._load(key)
            assert weights is not None  # a demand load may evict anything but itself
        else:
            self.stats.hits += 1
            if key in self.prefetched:
                self.stats.prefetch_hits += 1
            future = self.pending.pop(key, None)
            if future is not None:
                assert self.background is not None
                start = time.perf_counter()
                weights = self.resident[key] = self.background.wait(future)
                self.stats.wait_seconds += time.perf_counter() - start
        self.prefetched.discard(key)
        self.policy.access(key)
        return weights

    def prefetch(self, key: Key) -> None:
        """Load the expert ahead of its use (not an access; nothing happens when it is resident)."""
        if key not in self.resident and self._load(key, prefetching=True) is not None:
            self.stats.prefetches += 1
            self.prefetched.add(key)

    def new_request(self) -> None:
        self.policy.new_request()

    def before_layer(self, layer: int, counts: dict[int, int]) -> None:
        """Called before an offloaded layer runs, with its activated experts ``{expert: tokens}`` (a hook for
        caches that schedule by layer, such as the bit-nested one; nothing here)."""

    def after_layer(self, layer: int) -> None:
        """Called after an offloaded layer ran (a hook, see :meth:`before_layer`)."""
