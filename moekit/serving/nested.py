"""Bit-nested expert offloading: D²MoE's memory-budget scheduler with hottest-expert-bit-first (HEBF) loading,
and misses served at a low-bit prefix (HOBBIT style). Spec ``compression-adaptation-serving.md`` §7.

Dim legend: R rows, C columns, N scale groups per row, L residual levels (bit planes above the base).

The experts come from a ``d2moe-mwq`` compressed model (:mod:`moekit.compression.mwq`): per matrix, a ``bits``-bit
base plus ``L`` binary residual planes, where any prefix is a valid lower-bit expert. Here an expert is cached
*plane by plane*: plane 0 is the base (its code planes, per-group scale and zero, and the biases), plane ``k ≥ 1``
is residual sign plane ``k`` with its scales. The budget ``M`` counts the stored (packed) bytes of resident planes;
weights are dequantised when an expert runs, as :class:`~moekit.compression.bank.CompressedBank` does.

Per MoE layer, with the layer's activated experts and their token counts known:

1. *Demand* (before the layer runs): every activated expert needs planes ``0..miss_levels``. Missing planes are
   loaded in HEBF order (:func:`hebf_order`): one queue per expert in ascending plane order; repeatedly the head
   of the hottest expert's queue goes to the I/O queue. A miss is therefore served at ``bits + miss_levels`` bits.
2. *Upgrade* (after the layer ran, where a real system overlaps it with the next layer's compute): the same
   experts' higher planes up to ``max_levels`` are loaded in HEBF order, but only into free space or space freed
   from residual planes of strictly colder experts; bases are never evicted to upgrade.
3. *Eviction* (the D²MoE memory-budget rule): the victim is always the top plane of an unpinned resident expert:
   planes above the ``miss_levels`` prefix before any plane an expert needs to run (with ``miss_levels=0``: residual
   planes before any base), then the coldest expert first, then least recently used. So the low-bit prefixes,
   shared by every request, tend to stay resident, and the hottest experts keep the most planes.

*Choices made* (the spec gives the order but not the bookkeeping): an expert's heat is its count of routed tokens
since the cache was built plus an optional profiled prior (MoE-Infinity-like), not D²MoE's offline profile alone;
"the previous layer's planes first" becomes "the coldest expert's planes first"; every token of a layer is served
at the same bit-width (the trained per-token bit-width router of D²MoE is not built, so the plane heat of an
expert's queue is its token count for every plane).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..compression.bank import BankSpec, CompressedBank
from ..compression.mwq import reconstruct
from ..compression.quant import unpack_bits
from ..experts.activations import is_gated
from ..layers import MoE
from .cache import CacheStats, ExpertCache, Key, Policy, Weights
from .offload import Offload, OffloadedExpertBank, parse_budget

__all__ = ["NestedExpertCache", "NestedStore", "hebf_order", "offload_nested"]

Plane = dict[str, torch.Tensor]


def hebf_order(queues: Mapping[int, Sequence[int]], heat: Mapping[int, float]) -> list[tuple[int, int]]:
    """Hottest-expert-bit-first: the I/O order of ``(expert, plane)`` over per-expert ascending plane queues.

    Repeatedly, among the heads of the non-empty queues, the head of the hottest expert is popped (ties: the
    lower plane, then the lower expert id). Each expert's planes therefore come in ascending order.
    """
    queues_ = {e: list(q) for e, q in queues.items() if q}
    for e, q in queues_.items():
        if q != sorted(q):
            raise ValueError(f"expert {e}'s planes {q} are not in ascending order; a bit plane needs the ones below")
    order: list[tuple[int, int]] = []
    while queues_:
        e = min(queues_, key=lambda i: (-heat.get(i, 0.0), queues_[i][0], i))
        order.append((e, queues_[e].pop(0)))
        if not queues_[e]:
            del queues_[e]
    return order


class NestedStore:
    """Reads single bit planes of single experts of nested (``d2moe-mwq``) banks.

    Args:
        banks: per offloaded layer, ``(spec, read)`` where ``read(buffer name)`` gives something sliceable like
            the stacked buffer (a tensor, or a safetensors slice of a memory-mapped file).
    """

    def __init__(self, banks: Sequence[tuple[BankSpec, Callable[[str], Any]]]) -> None:
        for i, (spec, _) in enumerate(banks):
            if spec.format != "nested":
                raise ValueError(f"offloaded layer {i} stores its experts as {spec.format!r}, not bit-nested; "
                                 f"compress the run with method 'd2moe-mwq' first")
            if spec.num_stored != spec.num_experts:
                raise ValueError(f"offloaded layer {i} maps {spec.num_experts} slots onto {spec.num_stored} stored "
                                 f"experts; bit-nested offloading needs one stored expert per slot")
        self.specs = [s for s, _ in banks]
        self._read = [r for _, r in banks]
        self.levels = min(s.levels for s in self.specs) if self.specs else 0

    @property
    def num_layers(self) -> int:
        return len(self.specs)

    def num_experts(self, layer: int) -> int:
        return self.specs[layer].num_experts

    def plane_bytes(self, key: Key, k: int) -> int:
        """Packed bytes of plane ``k`` of expert ``key`` (0: base + scales + zeros + biases; k ≥ 1: one sign plane)."""
        s = self.specs[key[0]]
        total = 0
        for R, C in s.matrices().values():
            N = -(-C // s.group_size)
            total += (s.bits if k == 0 else 1) * R * ((C + 7) // 8) + (2 if k == 0 else 1) * R * N * 2
        if k == 0 and s.use_bias:
            total += 4 * (s.hidden_dim * (2 if is_gated(s.activation) else 1) + s.dim)
        return total

    def expert_bytes(self, key: Key, levels: int | None = None) -> int:
        top = self.levels if levels is None else levels
        return sum(self.plane_bytes(key, k) for k in range(top + 1))

    @property
    def total_bytes(self) -> int:
        return sum(self.expert_bytes((i, 0)) * s.num_experts for i, s in enumerate(self.specs))

    def load_plane(self, key: Key, k: int) -> Plane:
        """The tensors of plane ``k`` of expert ``key``, copied out of the source (what the cache owns)."""
        layer, e = key
        s, read = self.specs[layer], self._read[layer]
        out: Plane = {}
        for m in s.matrices():
            if k == 0:
                out[f"{m}_base"] = read(f"{m}_planes")[e:e + 1, :s.bits][0].clone()
                out[f"{m}_scale"] = read(f"{m}_scale")[e:e + 1][0].clone()
                out[f"{m}_zero"] = read(f"{m}_zero")[e:e + 1][0].clone()
            else:
                out[f"{m}_sign"] = read(f"{m}_planes")[e:e + 1, s.bits + k - 1:s.bits + k][0].clone()
                out[f"{m}_rscale"] = read(f"{m}_rscale")[e:e + 1, k - 1:k][0].clone()
        if k == 0 and s.use_bias:
            for b in ("b_gate", "b_up", "b_down"):
                if b != "b_gate" or is_gated(s.activation):
                    out[b] = read(b)[e:e + 1][0].clone()
        return out

    def weights(self, layer: int, planes: Sequence[Plane]) -> Weights:
        """Float weights from the base and the residual planes given (exactly CompressedBank's dequantisation)."""
        s = self.specs[layer]
        base, levels = planes[0], len(planes) - 1
        out: Weights = {}
        for m, (_, C) in s.matrices().items():
            signs = torch.stack([unpack_bits(p[f"{m}_sign"], C) * 2 - 1 for p in planes[1:]]) if levels \
                else torch.zeros(0, 1, C)
            rscale = torch.cat([p[f"{m}_rscale"] for p in planes[1:]]) if levels else torch.zeros(0)
            out[m] = reconstruct(unpack_bits(base[f"{m}_base"], C), signs, base[f"{m}_scale"], base[f"{m}_zero"],
                                 rscale, s.group_size, levels)
        for b in ("b_gate", "b_up", "b_down"):
            if b in base:
                out[b] = base[b]
        return out


class NestedExpertCache(ExpertCache):
    """Experts cached plane by plane under a byte budget (the module docstring gives the rules).

    Args:
        capacity_bytes: the budget ``M`` for resident planes (packed bytes).
        store: a :class:`NestedStore`.
        miss_levels: residual planes loaded before a missing expert runs (0: served from the base alone).
        max_levels: the most residual planes an expert ever runs with (default: all stored).
        prior: ``{key: heat}`` profiled from earlier traffic; optional.
        keep_bases: upgrades never evict a plane of the ``miss_levels`` prefix (D²MoE: the low-bit planes all
            requests share stay resident); False lets an upgrade evict colder experts' prefixes too (higher planes
            still go first), so that under a tight budget the hottest experts reach full precision at the cost of
            more (low-bit) misses.

    Counters (``stats``): ``hits`` / ``misses`` (the expert's planes ``0..miss_levels`` were / were not all resident
    when its layer asked: a miss needs a load before it can run),
    ``low_bit`` (accesses that ran with fewer than ``max_levels`` residual planes: a miss served at the low-bit
    prefix, or an expert not yet upgraded), ``bytes_moved``, ``plane_loads``; ``levels_served`` sums the residual
    planes each access ran with.
    """

    stats: NestedStats

    def __init__(self, capacity_bytes: int, store: NestedStore, *, miss_levels: int = 0, max_levels: int | None = None,
                 prior: Mapping[Key, float] | None = None, keep_bases: bool = True) -> None:
        top = store.levels if max_levels is None else max_levels
        if not 0 <= top <= store.levels:
            raise ValueError(f"max_levels={max_levels} must be between 0 and the {store.levels} residual planes "
                             f"stored")
        if not 0 <= miss_levels <= top:
            raise ValueError(f"miss_levels={miss_levels} must be between 0 and max_levels={top}")
        smallest = min((store.expert_bytes((i, 0), miss_levels) for i in range(store.num_layers)), default=0)
        largest = max((store.expert_bytes((i, 0), miss_levels) for i in range(store.num_layers)), default=0)
        if capacity_bytes < largest:
            raise ValueError(f"expert memory of {capacity_bytes} bytes cannot hold one expert's {miss_levels + 1} "
                             f"lowest planes ({largest} bytes; smallest layer {smallest}); raise it to at least "
                             f"{largest} bytes or lower miss_levels")
        super().__init__(capacity_bytes, Policy(), lambda key: store.weights(key[0], [store.load_plane(key, 0)]),
                         lambda key: store.expert_bytes(key, top))
        self.store, self.miss_levels, self.max_levels, self.keep_bases = store, miss_levels, top, keep_bases
        self.planes: dict[Key, list[Plane]] = {}
        self.heat: dict[Key, float] = dict(prior or {})
        self.last_use: dict[Key, int] = {}
        self.clock = 0
        self.stats = NestedStats()
        self.log: list[tuple[str, Key, int]] = []  # ("load" | "evict", key, plane), for tests and figures
        self.max_used = 0
        self.record_log = True
        self._layer_counts: dict[int, int] = {}
        self._layer = -1
        self._missed: set[Key] = set()

    # ---- bookkeeping -----------------------------------------------------------------------------------------

    def levels_of(self, key: Key) -> int:
        """Residual planes resident for ``key`` (-1: not resident)."""
        return len(self.planes.get(key, [])) - 1

    @property
    def resident(self) -> dict[Key, Weights]:
        return {k: {} for k in self.planes}

    @resident.setter
    def resident(self, value: dict[Key, Weights]) -> None:  # the base class assigns an empty dict
        pass

    def _required(self, key: Key) -> bool:
        """Whether ``key``'s top resident plane is one it needs to run (at or below ``miss_levels``)."""
        return len(self.planes[key]) - 1 <= self.miss_levels

    def _evict_top(self, protect: set[Key], colder_than: float | None = None) -> bool:
        """Free the top plane of the best victim; ``colder_than``: only planes of colder experts (upgrades)."""
        cands = [k for k in self.planes if k not in protect
                 and (colder_than is None or ((not self._required(k) or not self.keep_bases)
                                              and self.heat.get(k, 0.0) < colder_than))]
        if not cands:
            return False
        victim = min(cands, key=lambda k: (self._required(k), self.heat.get(k, 0.0), self.last_use.get(k, -1)))
        k = len(self.planes[victim]) - 1
        self.planes[victim].pop()
        if not self.planes[victim]:
            del self.planes[victim]
        self.used_bytes -= self.store.plane_bytes(victim, k)
        if self.record_log:
            self.log.append(("evict", victim, k))
        return True

    def _load_plane(self, key: Key, k: int, protect: set[Key], colder_than: float | None = None) -> bool:
        assert k == len(self.planes.get(key, []))  # planes arrive in ascending order
        size = self.store.plane_bytes(key, k)
        while self.used_bytes + size > self.capacity_bytes:
            if not self._evict_top(protect | {key}, colder_than):
                return False
        start = time.perf_counter()
        plane = self.store.load_plane(key, k)
        self.stats.load_seconds += time.perf_counter() - start
        self.planes.setdefault(key, []).append(plane)
        self.used_bytes += size
        self.max_used = max(self.max_used, self.used_bytes)
        self.stats.bytes_moved += size
        self.stats.plane_loads += 1
        if self.record_log:
            self.log.append(("load", key, k))
        return True

    def _schedule(self, layer: int, experts: Sequence[int], top: int, protect: set[Key],
                  colder: bool) -> None:
        """Load the experts' missing planes up to ``top`` in HEBF order; stop an expert's queue at a plane that
        does not fit (demand: without evicting ``protect``; upgrade: only into colder experts' residual planes)."""
        heat = {e: self.heat.get((layer, e), 0.0) for e in experts}
        queues = {e: list(range(self.levels_of((layer, e)) + 1, top + 1)) for e in experts}
        for e, k in hebf_order(queues, heat):
            key = (layer, e)
            if k == len(self.planes.get(key, [])):  # else a lower plane of this expert did not fit
                self._load_plane(key, k, protect, heat[e] if colder else None)

    # ---- the hooks Offload calls ------------------------------------------------------------------------------

    def before_layer(self, layer: int, counts: Mapping[int, int]) -> None:
        """Heat update and demand loads (HEBF order) for the layer's activated experts ``{expert: tokens}``."""
        keys = [(layer, e) for e in counts]
        for key in keys:
            self.heat[key] = self.heat.get(key, 0.0) + counts[key[1]]
        self._missed = {key for key in keys if self.levels_of(key) < self.miss_levels}
        self.pinned = set(keys)
        self._layer, self._layer_counts = layer, dict(counts)
        self._schedule(layer, list(counts), self.miss_levels, set(keys), colder=False)

    def after_layer(self, layer: int) -> None:
        """Upgrade the layer's experts towards ``max_levels`` (HEBF), evicting only colder experts' residual planes."""
        experts = list(self._layer_counts) if layer == self._layer else []
        self.pinned = set()
        self._schedule(layer, experts, self.max_levels, set(), colder=True)
        self._layer_counts = {}

    def get(self, key: Key) -> Weights:
        """The expert's float weights at the precision resident now (a demand access)."""
        if key in self._missed or self.levels_of(key) < self.miss_levels:
            self.stats.misses += 1
            self._missed.discard(key)
        else:
            self.stats.hits += 1
        if self.levels_of(key) < self.miss_levels:  # not loaded ahead (budget, or no before_layer): load now,
            self.heat.setdefault(key, 1.0)  # evicting anything but this expert
            for k in range(len(self.planes.get(key, [])), self.miss_levels + 1):
                if not self._load_plane(key, k, set()):
                    raise RuntimeError(f"expert {key} does not fit the budget of {self.capacity_bytes} bytes")
        levels = min(self.levels_of(key), self.max_levels)
        if levels < self.max_levels:
            self.stats.low_bit += 1
        self.stats.levels_served += levels
        self.last_use[key] = self.clock
        self.clock += 1
        return self.store.weights(key[0], self.planes[key][:levels + 1])

    def prefetch(self, key: Key) -> None:
        """Load the expert's low planes ahead (never evicting what the running layer needs)."""
        if key in self.planes:
            return
        for k in range(self.miss_levels + 1):
            if not self._load_plane(key, k, set(self.pinned)):
                return
        self.stats.prefetches += 1
        self.prefetched.add(key)


class NestedStats(CacheStats):
    """:class:`CacheStats` plus the counters of bit-nested caching."""

    def __init__(self) -> None:
        super().__init__()
        self.low_bit = self.levels_served = self.plane_loads = 0

    def as_dict(self) -> dict[str, Any]:
        served = self.hits + self.misses
        return {**super().as_dict(), "low_bit": self.low_bit, "plane_loads": self.plane_loads,
                "full_precision_rate": 1 - self.low_bit / served if served else 1.0,
                "mean_levels_served": self.levels_served / served if served else 0.0}


def offload_nested(model: nn.Module, expert_memory: str | int = "100%", *, miss_levels: int = 0,
                   max_levels: int | None = None, prefetch: str = "none", prior: Mapping[Key, float] | None = None,
                   keep_bases: bool = True, record: bool = True) -> Offload:
    """Offload a model's bit-nested experts (layers compressed with ``d2moe-mwq``) plane by plane, in place.

    The banks' packed buffers are the store (on a model compressed in memory or loaded with
    :func:`moekit.training.load_run`); :func:`~moekit.serving.nested_run.load_offloaded_nested` reads them from a
    compressed run's file instead. Each layer's bank is replaced by an :class:`~moekit.serving.offload.OffloadedExpertBank` over a
    :class:`NestedExpertCache`.

    Args:
        model: a model whose MoE layers hold ``nested`` CompressedBanks.
        expert_memory: the budget: ``"25%"`` of all experts' stored bytes (every plane), or bytes.
        miss_levels / max_levels / prior / keep_bases: see :class:`NestedExpertCache`.
        prefetch: ``none`` or ``router`` (the next layer's router; loads the guessed experts' low planes).
    """
    layers, banks = _nested_layers(model)
    readers = [_buffer_reader(b) for b in banks]
    return _install(layers, banks, readers, expert_memory, miss_levels, max_levels, prefetch, prior, keep_bases,
                    record)


def _nested_layers(model: nn.Module) -> tuple[list[MoE], list[CompressedBank]]:
    layers: list[MoE] = []
    banks: list[CompressedBank] = []
    for m in model.modules():
        if isinstance(m, MoE) and isinstance(m.experts, CompressedBank):
            layers.append(m)
            banks.append(m.experts)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no compressed MoE layers; compress it with method "
                         f"'d2moe-mwq' (moekit compress RUN --method d2moe-mwq) before bit-nested offloading")
    return layers, banks


def _install(layers: list[MoE], banks: list[CompressedBank], readers: Sequence[Callable[[str], Any]],
             expert_memory: str | int, miss_levels: int, max_levels: int | None, prefetch: str,
             prior: Mapping[Key, float] | None, keep_bases: bool, record: bool) -> Offload:
    if prefetch not in ("none", "router"):
        raise ValueError(f"prefetch={prefetch!r}: bit-nested offloading supports 'none' and 'router'")
    store = NestedStore([(b.spec, r) for b, r in zip(banks, readers, strict=True)])
    top = store.levels if max_levels is None else max_levels
    if not 0 <= miss_levels <= store.levels:
        raise ValueError(f"miss_levels={miss_levels} must be between 0 and the {store.levels} residual planes stored")
    smallest = max(store.expert_bytes((i, 0), miss_levels) for i in range(store.num_layers))
    budget = parse_budget(expert_memory, store.total_bytes, smallest)
    cache = NestedExpertCache(budget, store, miss_levels=miss_levels, max_levels=top, prior=prior,
                              keep_bases=keep_bases)
    cache.record_log = record  # the load/evict log grows with every plane moved: off for servers
    offload = Offload(store, cache, layers, prefetch, None, record)  # type: ignore[arg-type]
    for i, moe in enumerate(layers):
        moe.experts = OffloadedExpertBank(banks[i], i, offload)  # type: ignore[arg-type,assignment]
        moe.config = dataclasses.replace(moe.config, engine="offload")
    return offload


def _buffer_reader(bank: CompressedBank) -> Callable[[str], torch.Tensor]:
    buffers = {name: t.detach() for name, t in bank.named_buffers()}
    return buffers.__getitem__
