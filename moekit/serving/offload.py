"""Expert offloading: the routed experts of a run stay in its safetensors file (memory-mapped) and are loaded
per ``(layer, expert)`` on demand into an :class:`~moekit.serving.cache.ExpertCache` with a byte budget.

Dim legend: T tokens, D model dim, F expert hidden dim, K slots per token.

Only the experts leave resident memory: the model is built with its expert banks on the ``meta`` device, every
other tensor is read from the file, and each plain :class:`~moekit.MoE` layer gets an
:class:`OffloadedExpertBank` and the ``offload`` engine. That engine is the ``reference`` engine's loop over the
experts present in the routing (ascending ids, the same ``index_add``), so an offloaded model's outputs are
bit-identical to the resident model run with ``engine="reference"`` (and equal to any other engine up to float
rounding).

Prefetch (Mixtral-offloading / Pre-gated MoE, spec §11): before layer ``l`` runs its experts, the next layer's
router scores layer ``l``'s FFN input and its top-k experts are loaded ahead (``prefetch="router"``), or the
experts that most often followed this layer's experts in a profiled trace (``prefetch="affinity"``). On the CPU
the load is synchronous (a copy out of the page cache). With ``device="cuda"`` the cache holds the experts on
the GPU and the file stays in host memory. With ``asynchronous=True`` prefetches are copied on a background
thread (and a CUDA side stream) while the layer computes (:mod:`.background`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from ..dispatch import register_engine
from ..experts import ExpertBank
from ..experts.activations import hidden
from ..layers import MoE
from ..models import LanguageModel
from ..training.checkpoint import CheckpointError, read_state, weights_path
from ..training.config import RunConfig
from ..training.runs import read_run_config
from ..types import Routing
from .background import BackgroundLoader
from .cache import ExpertCache, Key, Policy, make_policy

__all__ = ["PREFETCHERS", "ExpertStore", "Offload", "OffloadedExpertBank", "load_offloaded", "open_store", "parse_budget"]

PREFETCHERS = ("none", "router", "affinity", "m2r2")
_PROJ = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


class ExpertStore:
    """Reads single experts out of a safetensors file without reading the rest (``safe_open`` memory-maps it).

    Args:
        path: the weights file.
        layer_names: module names of the offloaded MoE layers (``layers.3.ffn``), in depth order.
    """

    def __init__(self, path: Path, layer_names: list[str]) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path} cannot be opened ({e}); re-run training or restore the file") from None
        keys = set(self._file.keys())
        self.layer_names = layer_names
        self.names: list[list[str]] = []  # per layer: the projection names present ("w_up", ...)
        self.expert_bytes: list[int] = []
        for layer in layer_names:
            present = [p for p in _PROJ if f"{layer}.experts.{p}" in keys]
            if "w_up" not in present or "w_down" not in present:
                raise CheckpointError(f"{self.path} holds no experts for {layer}; it does not belong to this model")
            self.names.append(present)
            size = 0
            for p in present:
                sl = self._file.get_slice(f"{layer}.experts.{p}")
                shape, itemsize = sl.get_shape(), _itemsize(sl.get_dtype())
                size += itemsize * int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else itemsize
            self.expert_bytes.append(size)

    @property
    def total_bytes(self) -> int:
        return sum(b * self.num_experts(i) for i, b in enumerate(self.expert_bytes))

    def num_experts(self, layer: int) -> int:
        return self._file.get_slice(f"{self.layer_names[layer]}.experts.w_up").get_shape()[0]

    def nbytes(self, key: Key) -> int:
        return self.expert_bytes[key[0]]

    def load(self, key: Key) -> dict[str, torch.Tensor]:
        """``{projection: tensor}`` of expert ``key[1]`` of layer ``key[0]``, read from the file."""
        layer, e = key
        name = self.layer_names[layer]
        # get_slice gives a view of the memory-mapped file; the copy is what the cache owns and budgets
        return {p: self._file.get_slice(f"{name}.experts.{p}")[e:e + 1][0].clone() for p in self.names[layer]}

    def tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def keys(self) -> set[str]:
        return set(self._file.keys())

    def metadata(self) -> dict[str, str]:
        return self._file.metadata() or {}


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}[dtype]


_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_budget(budget: str | float, total_bytes: int, min_bytes: int) -> int:
    """Bytes of an expert budget: ``"25%"`` of all experts, or bytes (``123456``, ``"64MiB"``, ``"1.5G"``)."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = int(budget)
    else:
        m = _BUDGET.match(str(budget))
        if not m:
            raise ValueError(f"expert memory {budget!r} is not a budget; give a share like '25%' or bytes like "
                             f"'64MiB' or 1000000")
        number, unit = float(m.group(1)), (m.group(2) or "").lower() or None
        value = int(total_bytes * number / 100) if unit == "%" else int(number * _UNITS[unit])
    if value < min_bytes:
        raise ValueError(f"expert memory {budget!r} ({value} bytes) is smaller than one expert ({min_bytes} "
                         f"bytes); raise it to at least {min_bytes} bytes "
                         f"({100 * min_bytes / max(total_bytes, 1):.2f}% of all experts)")
    return value


class OffloadedExpertBank(nn.Module):
    """An expert bank whose weights live in an :class:`ExpertCache`; ``expert(x, e)`` as in ExpertBank."""

    def __init__(self, bank: ExpertBank, layer: int, offload: Offload) -> None:
        super().__init__()
        spec = getattr(bank, "spec", None)
        if spec is not None and (spec.act_bits or spec.rotate):
            raise ValueError(f"layer {layer}'s compressed experts quantise or rotate their activations "
                             f"(act_bits={spec.act_bits}, rotate={spec.rotate}), which offloading does not "
                             f"reproduce; serve this run without expert offloading")
        self.num_experts, self.dim, self.hidden_dim = bank.num_experts, bank.dim, bank.hidden_dim
        self.activation, self.gated = bank.activation, bank.gated
        self.use_bias = getattr(bank, "use_bias", False)  # a CompressedBank keeps it in its spec; expert() reads
        # whichever biases the cache hands back
        self.layer = layer
        self._offload = [offload]  # a list, so that nn.Module does not register it as a child

    @property
    def offload(self) -> Offload:
        return self._offload[0]

    def expert(self, x_TD: torch.Tensor, e: int) -> torch.Tensor:
        return self.run_expert(x_TD, self.fetch(e))

    def fetch(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s weights through the cache (a demand access)."""
        return self.offload.cache.get((self.layer, e))

    def run_expert(self, x_TD: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """The expert with weights ``w`` on ``x_TD`` (as ExpertBank.expert)."""
        dev = x_TD.device
        h_up = F.linear(x_TD, w["w_up"].to(dev), _opt(w, "b_up", dev))
        h_gate = F.linear(x_TD, w["w_gate"].to(dev), _opt(w, "b_gate", dev)) if self.gated else None
        return F.linear(hidden(self.activation, h_gate, h_up), w["w_down"].to(dev), _opt(w, "b_down", dev))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


def _opt(w: dict[str, torch.Tensor], name: str, dev: torch.device) -> torch.Tensor | None:
    t = w.get(name)
    return None if t is None else t.to(dev)


def _offload_supports(x: torch.Tensor, bank) -> str | None:
    return None if isinstance(bank, OffloadedExpertBank) else "only offloaded expert banks (moekit.serving)"


@register_engine("offload", priority=-1, supports=_offload_supports)
def offload_engine(x_TD: torch.Tensor, routing: Routing, bank: OffloadedExpertBank) -> torch.Tensor:
    """The reference loop over the experts present in ``routing``, fetching each through the cache.

    All of the layer's experts are fetched (demand loads) before the next layer's prefetch is issued and before
    any of them computes, the order the simulator replays; so a demand load never evicts a fresh prefetch, and an
    asynchronous prefetch overlaps this layer's compute. Holding the fetched weights can briefly exceed a budget
    smaller than the layer's experts together (the cache's accounting still evicts them).
    """
    ids_TK, weights_TK = routing.expert_ids_TK, routing.weights_TK.to(x_TD.dtype)
    used, counts = torch.unique(ids_TK[ids_TK >= 0], return_counts=True)
    present = [int(e) for e in used.tolist()]  # torch.unique sorts: ascending ids, as the reference engine
    bank.offload.before_layer(bank.layer, present, x_TD, dict(zip(present, counts.tolist(), strict=True)))
    fetched = {e: bank.fetch(e) for e in present}
    bank.offload.prefetch_next(bank.layer)
    y_TD = torch.zeros_like(x_TD)
    for e in present:
        token_idx, slot_idx = torch.nonzero(ids_TK == e, as_tuple=True)
        out = bank.run_expert(x_TD[token_idx], fetched[e])
        y_TD = y_TD.index_add(0, token_idx, weights_TK[token_idx, slot_idx, None] * out)
    bank.offload.after_layer(bank.layer)
    return y_TD


class Offload:
    """The offloading state of one model: store, cache, prefetcher, and the trace of accesses.

    ``trace`` holds one entry per forward pass: per offloaded layer ``{"experts": [...], "predicted": [...]}``,
    where ``predicted`` is the next layer's router's top-k on this layer's input (on M2R2's fast state with
    ``prefetch="m2r2"``), recorded whatever the live prefetcher, so that the simulator can replay it.
    """

    def __init__(self, store: ExpertStore, cache: ExpertCache, moes: list[MoE], prefetch: str = "none",
                 affinity: dict[Key, list[int]] | None = None, record: bool = True,
                 accelerators: nn.Module | None = None) -> None:
        if prefetch not in PREFETCHERS:
            raise ValueError(f"unknown prefetcher {prefetch!r}; choose one of {', '.join(PREFETCHERS)}")
        if prefetch == "affinity" and affinity is None:
            raise ValueError("prefetch='affinity' needs an affinity table (moekit.serving.trace.affinity_table)")
        if prefetch == "m2r2" and accelerators is None:
            raise ValueError("prefetch='m2r2' needs trained accelerators (moekit.serving.m2r2.train_accelerators)")
        self.accelerators = accelerators
        self.store, self.cache, self.moes, self.prefetch = store, cache, moes, prefetch
        self.affinity = affinity or {}
        self.record = record
        self.trace: list[list[dict]] = []
        self._step: list[dict] = []
        self._targets: list[Key] = []

    @property
    def num_layers(self) -> int:
        return len(self.moes)

    def before_layer(self, layer: int, experts: list[int], x_TD: torch.Tensor,
                     counts: dict[int, int] | None = None) -> None:
        if layer == 0 and self._step:
            self._flush()
        self.cache.before_layer(layer, counts if counts is not None else dict.fromkeys(experts, 1))
        predicted = self._predict_next(layer, x_TD) if layer + 1 < self.num_layers else []
        if self.record:
            self._step.append({"experts": experts, "predicted": predicted})
        self.cache.pinned = {(layer, e) for e in experts}
        if self.prefetch in ("router", "m2r2"):
            targets = predicted
        elif self.prefetch == "affinity":
            targets = sorted({f for e in experts for f in self.affinity.get((layer, e), [])})
        else:
            targets = []
        self._targets = [(layer + 1, e) for e in targets] if layer + 1 < self.num_layers else []

    def prefetch_next(self, layer: int) -> None:
        """Issue the prefetches :meth:`before_layer` chose, once the layer's own experts are fetched."""
        self.cache.pinned |= set(self._targets)  # a prefetch never evicts these or the running layer's experts
        for key in self._targets:
            self.cache.prefetch(key)
        self._targets = []

    def after_layer(self, layer: int) -> None:
        self.cache.pinned = set()  # pins guard prefetches only; demand loads may evict anything but themselves
        self.cache.after_layer(layer)
        if layer == self.num_layers - 1:
            self._flush()

    def _flush(self) -> None:
        if self._step:
            self.trace.append(self._step)
        self._step = []

    @torch.no_grad()
    def _predict_next(self, layer: int, x_TD: torch.Tensor) -> list[int]:
        if self.prefetch == "m2r2" and self.accelerators is not None:  # M2R2: the router on the fast stream
            x_TD = self.accelerators(layer, x_TD)
        routing = self.moes[layer + 1].route(x_TD)
        ids = routing.expert_ids_TK
        return sorted(int(e) for e in torch.unique(ids[ids >= 0]).tolist())

    def new_request(self) -> None:
        self.cache.new_request()


def _offloadable(model: LanguageModel) -> list[tuple[str, MoE]]:
    """Every plain :class:`MoE` with an ExpertBank, in depth order, also inside a variant that wraps one (top-p,
    GMoE, PR-MoE, SMoE-Dropout, BlockFFN hold theirs as ``.moe``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and type(m.experts) is ExpertBank]


@contextlib.contextmanager
def _experts_on_meta() -> Iterator[None]:
    """Build every ExpertBank's parameters on the meta device (no memory); the rest of the model as usual."""
    original = ExpertBank.__init__

    def init(self, *args, **kwargs):
        with torch.device("meta"):
            original(self, *args, **kwargs)

    ExpertBank.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        ExpertBank.__init__ = original  # type: ignore[method-assign]


def open_store(run_dir: str | Path) -> ExpertStore:
    """The :class:`ExpertStore` of a run's offloadable experts (nothing but the file's header is read)."""
    cfg = read_run_config(run_dir)
    with torch.device("meta"):
        model = LanguageModel(cfg.model)
    return ExpertStore(weights_path(run_dir), [name for name, _ in _offloadable(model)])


def load_offloaded(run_dir: str | Path, expert_memory: str | int = "100%", policy: str | Policy = "lru", *,
                   prefetch: str = "none", affinity: dict[Key, list[int]] | None = None,
                   device: str = "cpu", record: bool = True, asynchronous: bool = False,
                   accelerators: nn.Module | None = None) -> tuple[RunConfig, LanguageModel, Offload]:
    """``(run config, model in eval mode, Offload)``: a run's model with its routed experts offloaded.

    Args:
        run_dir: a run folder written by ``moekit train``.
        expert_memory: the budget for resident experts: ``"25%"`` of all experts, or bytes.
        policy: ``lru``, ``lfu``, ``activation`` or a :class:`Policy` (``belady`` needs its future).
        prefetch: ``none``, ``router`` (next layer's router), ``affinity`` (needs ``affinity``) or ``m2r2`` (the
            next router on M2R2's fast state; needs ``accelerators`` from :func:`moekit.serving.m2r2.train_accelerators`).
        device: where the non-expert weights and the computation live.
        record: keep the trace of expert accesses (``Offload.trace``; off for long-running servers).
        asynchronous: copy prefetched experts on a background thread (and, on CUDA, a side stream) while the
            current layer computes (:mod:`moekit.serving.background`); outputs are the same bits.
    """
    cfg = read_run_config(run_dir)
    state = read_state(Path(run_dir))
    with _experts_on_meta():
        model = LanguageModel(cfg.model)
    layers = _offloadable(model)
    meta_left = [n for n, p in model.named_parameters() if p.is_meta
                 and not any(n.startswith(f"{name}.experts.") for name, _ in layers)]
    if meta_left:
        raise ValueError(f"this model's variant keeps experts outside plain MoE layers ({meta_left[0]}); "
                         f"offloading supports models whose sparse layers are moekit.MoE; serve it resident")
    if not layers:
        raise ValueError("this model has no MoE layers to offload; serve it resident (no --expert-memory)")
    store = ExpertStore(weights_path(run_dir), [name for name, _ in layers])
    if store.metadata().get("step") not in (None, str(state["step"])):
        raise CheckpointError(f"{store.path} is from step {store.metadata().get('step')} but state.json says "
                              f"step {state['step']}; the checkpoint was interrupted; re-run training")
    _load_resident(model, store, {f"{name}.experts." for name, _ in layers})
    budget = parse_budget(expert_memory, store.total_bytes, max(store.expert_bytes))
    if isinstance(policy, str):
        policy = make_policy(policy, num_layers=len(layers), num_experts=max(m.config.num_experts for _, m in layers))
    target = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    def load(key: Key) -> dict[str, torch.Tensor]:  # the cache lives where the computation runs
        return {n: t.to(target) for n, t in store.load(key).items()}

    background = BackgroundLoader(store.load, target) if asynchronous else None
    cache = ExpertCache(budget, policy, load, store.nbytes, background)
    offload = Offload(store, cache, [moe for _, moe in layers], prefetch, affinity, record, accelerators)
    for i, (_, moe) in enumerate(layers):
        moe.experts = OffloadedExpertBank(moe.experts, i, offload)  # type: ignore[assignment]
        moe.config = dataclasses.replace(moe.config, engine="offload")
    model = model.to(target).eval()
    return cfg, model, offload


def _load_resident(model: nn.Module, store: ExpertStore, skip: set[str]) -> None:
    """Copy every non-expert tensor of the state dict from the file (aliases from its metadata)."""
    keys, aliases = store.keys(), store.metadata()
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if any(name.startswith(prefix) for prefix in skip):
                continue
            src = name if name in keys else aliases.get(name)
            if src not in keys:
                raise CheckpointError(f"{store.path} has no tensor {name!r}; it does not fit the model in "
                                      f"config.json")
            value = store.tensor(src)
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{store.path}: {name} has shape {tuple(value.shape)}, the model in "
                                      f"config.json expects {tuple(target.shape)}")
            target.copy_(value)
