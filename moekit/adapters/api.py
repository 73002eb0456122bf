"""Injecting adapters into a frozen model, and saving, loading, merging and converting them.

``apply(model, method, targets=..., **config)`` validates everything first, then wraps every target module in
place (``AdaptedLinear`` / ``AdaptedFFN``) and freezes every other parameter of the model. It returns an
:class:`Adapters` handle, also kept on the model (``adapters_of(model)``), so the module-level ``state_dict``,
``save``, ``load`` and ``merge`` take either.

An adapter file is a safetensors file holding only adapter and router tensors (named ``<module>.<tensor>``), with
a header naming the format, the method, its config, the targets and the adapted modules' shapes, so that a file
for another model or method is refused with a message that says which. Nothing is pickled.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..configs import from_dict, to_dict
from ..types import RoutingContext
from .core import (
    AdaptedFFN,
    AdaptedLinear,
    AdapterError,
    LinearAdapter,
    Session,
    check_rank,
    ffn_weights,
)
from .flylora import FlyLoRA, FlyLoRAConfig
from .glider import Glider, GliderConfig
from .lora import LoRA, LoRAConfig
from .mhr import MHR, MHRConfig, mhr_mu_from
from .mixlora import MixLoRA, MixLoRAConfig
from .mome import MoME, MoMEConfig
from .mos import MoS, MoSConfig, pool_for
from .rank1 import Rank1Config, Rank1Experts
from .routed import DynMoLE, DynMoLEConfig, LoRAMixer, LoRAMixerConfig
from .sema import SEMA, SEMAConfig

__all__ = [
    "FORMAT",
    "AdapterError",
    "Adapters",
    "adapters_of",
    "apply",
    "available",
    "convert",
    "load",
    "merge",
    "read_header",
    "save",
    "state_dict",
]

FORMAT = "moekit-adapters/1"
ATTR = "_moekit_adapters"


@dataclass(frozen=True)
class Method:
    """How a method is built: its config class, what it wraps (``linear`` or ``ffn``) and default targets."""

    config: type
    kind: str
    build: Callable[..., nn.Module]
    targets: tuple[str, ...]
    mergeable: bool = False


_LINEAR_TARGETS = ("w_qkv", "w_out", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
_FFN_TARGETS = ("ffn", "mlp")

METHODS: dict[str, Method] = {
    "lora": Method(LoRAConfig, "linear", lambda i, o, c, s: LoRA(i, o, c), _LINEAR_TARGETS, mergeable=True),
    "mixlora": Method(MixLoRAConfig, "ffn", None, _FFN_TARGETS),  # type: ignore[arg-type]  # built below
    "lora_mixer": Method(LoRAMixerConfig, "linear", lambda i, o, c, s: LoRAMixer(i, o, c), _LINEAR_TARGETS),
    "dynmole": Method(DynMoLEConfig, "linear", lambda i, o, c, s: DynMoLE(i, o, c), _LINEAR_TARGETS),
    "flylora": Method(FlyLoRAConfig, "linear", lambda i, o, c, s: FlyLoRA(i, o, c), _LINEAR_TARGETS),
    "poly": Method(MHRConfig, "linear", lambda i, o, c, s: MHR(i, o, c, lambda: s.task), _LINEAR_TARGETS),
    "mhr": Method(MHRConfig, "linear", lambda i, o, c, s: MHR(i, o, c, lambda: s.task), _LINEAR_TARGETS),
    "glider": Method(GliderConfig, "linear", lambda i, o, c, s: Glider(i, o, c, s), _LINEAR_TARGETS),
    "mome": Method(MoMEConfig, "linear", lambda i, o, c, s: MoME(i, o, c), _LINEAR_TARGETS),
    "sema": Method(SEMAConfig, "linear", lambda i, o, c, s: SEMA(i, o, c), _LINEAR_TARGETS),
    "mos": Method(MoSConfig, "linear", lambda i, o, c, s: MoS(i, o, c, pool_for(s, i, o, c)), _LINEAR_TARGETS,
                  mergeable=True),
    "rank1": Method(Rank1Config, "linear", lambda i, o, c, s: Rank1Experts(i, o, c), _LINEAR_TARGETS),
}
# Reached through convert() from an applied MHR; loadable from files.
_CONVERTED: dict[str, Method] = {
    "mhr_z": Method(MHRConfig, "linear", lambda i, o, c, s: MHR(i, o, c, lambda: s.task), _LINEAR_TARGETS),
    "mhr_mu": Method(LoRAConfig, "linear", lambda i, o, c, s: LoRA(i, o, c), _LINEAR_TARGETS, mergeable=True),
}


def available() -> list[str]:
    """The method names :func:`apply` accepts (``mhr_z`` and ``mhr_mu`` come from :func:`convert`)."""
    return list(METHODS)


def _method(name: str) -> Method:
    found = METHODS.get(name) or _CONVERTED.get(name)
    if found is None:
        raise AdapterError(f"unknown adapter method {name!r}; choose one of {available()}")
    return found


def _make_config(method: str, options: dict[str, Any]):
    cls = _method(method).config
    if method == "poly" and options.get("num_heads", 1) not in (1, "1"):
        raise AdapterError(f"poly is MHR with one head; got num_heads={options['num_heads']!r} (use method "
                           f"'mhr' for several heads)")
    if method == "mhr" and "num_heads" not in options:
        options = {**options, "num_heads": 4}
    return from_dict(cls, options, prefix=method)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def _resolve_targets(model: nn.Module, method: str, kind: str, targets: Iterable[str] | None) -> list[str]:
    targets = list(targets) if targets is not None else list(_method(method).targets)
    if isinstance(targets, str) or not targets:
        raise AdapterError(f"targets={targets!r} must be a non-empty list of module names or patterns")
    if kind == "linear":
        candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
        what = "nn.Linear"
    else:
        candidates = [n for n, m in model.named_modules() if n and ffn_weights(m) is not None]
        what = "feed-forward (moekit FeedForward or a gate_proj/up_proj/down_proj MLP)"
    chosen = [n for n in candidates if any(_matches(n, t) for t in targets)]
    if not chosen:
        raise AdapterError(f"targets {targets} match no {what} module of the model; {method} adapts {what} "
                           f"modules such as {candidates[:6]}")
    return chosen


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _shape(module: nn.Module) -> list[int]:
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    weights = ffn_weights(module)
    assert weights is not None
    return [weights.hidden_dim, weights.dim, int(weights.w_gate is not None)]


def _build(model: nn.Module, method: str, config, names: list[str], session: Session) -> dict[str, Any]:
    spec = _method(method)
    built: dict[str, Any] = {}
    for name in names:
        module: Any = model.get_submodule(name)
        if spec.kind == "linear":
            rank = getattr(config, "rank", 1)
            check_rank(method, name, rank, module.in_features, module.out_features)
            adapter: Any = spec.build(module.in_features, module.out_features, config, session)
            adapter.to(module.weight.device)
            built[name] = AdaptedLinear(module, adapter, name, session)
        else:
            weights = ffn_weights(module)
            assert weights is not None
            check_rank(method, name, config.rank, weights.dim, weights.hidden_dim)
            adapter = MixLoRA(weights.dim, weights.hidden_dim, weights.w_gate is not None, config)
            adapter.to(weights.w_up.device)
            built[name] = AdaptedFFN(module, adapter, name, session)
    return built


class Adapters:
    """The adapters injected into one model: their tensors, files, task, routing context, merge."""

    def __init__(self, model: nn.Module, method: str, config, names: list[str], session: Session,
                 wrappers: dict[str, Any], requires_grad: dict[str, bool]) -> None:
        self.model, self.method, self.config, self.names = model, method, config, names
        self.session, self.wrappers, self._requires_grad = session, wrappers, requires_grad
        self._hook = model.register_forward_pre_hook(session.pre_hook, with_kwargs=True)

    @property
    def context(self) -> RoutingContext | None:
        """The routing context of the last forward (add ``context.total_loss()`` to a transformers loss)."""
        return self.session.ctx

    def set_task(self, task: int) -> None:
        """The task id the task-routed methods (Poly, MHR, MHR-z) use for the next forwards."""
        self.session.task = int(task)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters (a tensor shared by several layers once)."""
        seen: dict[int, nn.Parameter] = {}
        for w in self.wrappers.values():
            for p in w.adapter.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only adapter and router tensors (persistent buffers included), named ``<module>.<tensor>``; a tensor
        shared by several layers (MoS pools) appears once, under the first layer's name."""
        out, seen = {}, set()
        for name, w in self.wrappers.items():
            for key, value in w.adapter.state_dict(keep_vars=True).items():
                if id(value) in seen:
                    continue
                seen.add(id(value))
                out[f"{name}.{key}"] = value.detach()
        return out

    def header(self) -> dict[str, str]:
        return {"format": FORMAT, "method": self.method, "config": json.dumps(to_dict(self.config)),
                "targets": json.dumps(self.names),
                "shapes": json.dumps({n: _shape(w.base) for n, w in self.wrappers.items()}),
                "structure": json.dumps({n: w.adapter.structure() for n, w in self.wrappers.items()
                                         if isinstance(w.adapter, LinearAdapter) and w.adapter.structure()})}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the adapter file atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=self.header())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise AdapterError(f"{source} does not fit these adapters: missing {missing[:4]}, unexpected "
                               f"{unexpected[:4]}")
        for key, value in tensors.items():
            if own[key].shape != value.shape:
                raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the model's adapter "
                                   f"has {tuple(own[key].shape)}; the file was saved for another model or config")
        with torch.no_grad():
            for name, w in self.wrappers.items():
                prefix = name + "."
                sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                w.adapter.load_state_dict(sub, strict=False)  # shared tensors: loaded under their first name

    def merge(self) -> nn.Module:
        """Fold each ``ΔW`` into its base weight and remove the wrappers (single-adapter methods only)."""
        if not _method(self.method).mergeable:
            raise AdapterError(f"{self.method} adapters route per input, so they cannot be folded into one weight; "
                               f"merge works for {[n for n, m in {**METHODS, **_CONVERTED}.items() if m.mergeable]}")
        with torch.no_grad():
            for w in self.wrappers.values():
                delta_OI = w.adapter.delta_weight()
                w.base.weight += delta_OI.to(w.base.weight.dtype)
        return self.remove()

    def remove(self) -> nn.Module:
        """Put the base modules back (unchanged unless merged) and restore their ``requires_grad``."""
        for name, w in self.wrappers.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, w.base)
        for pname, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(pname, p.requires_grad))
        self._hook.remove()
        if getattr(self.model, ATTR, None) is self:
            delattr(self.model, ATTR)
        return self.model


def adapters_of(model: nn.Module | Adapters) -> Adapters:
    """The :class:`Adapters` applied to ``model``."""
    if isinstance(model, Adapters):
        return model
    found = getattr(model, ATTR, None)
    if found is None:
        raise AdapterError("the model has no adapters; call moekit.adapters.apply(model, method, ...) or "
                           "moekit.adapters.load(model, path) first")
    return found


def apply(model: nn.Module, method: str, targets: Iterable[str] | None = None, *, collect_stats: bool = False,
          **config: Any) -> Adapters:
    """Inject ``method`` adapters into ``model`` in place and freeze every other parameter.

    Args:
        model: any ``nn.Module`` (moekit's language model, a transformers model, ...).
        method: one of :func:`available`.
        targets: module names, name suffixes (``"w_qkv"``, ``"q_proj"``) or glob patterns (``"layers.*.ffn"``);
            ``None`` uses the method's defaults (attention projections; the feed-forwards for ``mixlora``).
        collect_stats: the adapter layers record routing statistics when the model creates the context.
        **config: the method's config fields (e.g. ``rank=8, alpha=16``).
    """
    if getattr(model, ATTR, None) is not None:
        raise AdapterError(f"the model already has {getattr(model, ATTR).method} adapters; merge() or remove() "
                           f"them before applying others")
    spec = _method(method)
    cfg = _make_config(method, dict(config))
    names = _resolve_targets(model, method, spec.kind, targets)
    return _apply_resolved(model, method, cfg, names, collect_stats)


def state_dict(model: nn.Module | Adapters) -> dict[str, torch.Tensor]:
    """Adapter and router tensors only."""
    return adapters_of(model).state_dict()


def save(model: nn.Module | Adapters, path: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` to a safetensors file (atomically)."""
    return adapters_of(model).save(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed header of an adapter file (format, method, config, targets, shapes, structure)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {str(path)!r} does not exist; give a file written by adapters.save or "
                           f"moekit finetune")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a moekit adapter file (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        return {"method": meta["method"], "config": json.loads(meta["config"]),
                "targets": json.loads(meta["targets"]), "shapes": json.loads(meta["shapes"]),
                "structure": json.loads(meta.get("structure", "{}"))}
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path} has a damaged adapter header ({e})") from None


def _check_shapes(model: nn.Module, header: dict, path: Path) -> None:
    for name, shape in header["shapes"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{path} adapts module {name!r}, which this model does not have; the file belongs "
                               f"to another model") from None
        module = module.base if isinstance(module, (AdaptedLinear, AdaptedFFN)) else module
        actual = _shape(module) if (isinstance(module, nn.Linear) or ffn_weights(module) is not None) else None
        if actual != shape:
            raise AdapterError(f"{path} was saved for {name!r} of shape {shape}, but this model's {name!r} has "
                               f"shape {actual}; the file belongs to another model")


def load(model: nn.Module, path: str | os.PathLike, *, method: str | None = None, load_tensors: bool = True,
         collect_stats: bool = False) -> Adapters:
    """Load an adapter file into ``model``: applies the file's method, config and targets when the model has no
    adapters yet, or checks that they are those already applied. ``method`` (optional) is what the caller
    expects; a file of another method is refused."""
    path = Path(path)
    header = read_header(path)
    if method is not None and header["method"] != method:
        raise AdapterError(f"{path} holds {header['method']!r} adapters, not {method!r}; pass the matching "
                           f"--method or file")
    _check_shapes(model, header, path)
    existing = getattr(model, ATTR, None)
    if existing is None:
        m = header["method"]
        spec = _method(m)
        cfg: Any = from_dict(spec.config, header["config"], prefix=m)
        handle = _apply_resolved(model, m, cfg, header["targets"], collect_stats)
    else:
        handle = existing
        if handle.method != header["method"] or to_dict(handle.config) != header["config"] or \
                handle.names != header["targets"]:
            raise AdapterError(f"{path} holds {header['method']} adapters with config {header['config']} on "
                               f"{len(header['targets'])} modules, but the model has {handle.method} adapters with "
                               f"config {to_dict(handle.config)} on {len(handle.names)}; load into a fresh model")
    for name, structure in header["structure"].items():
        handle.wrappers[name].adapter.restructure(structure)
    if load_tensors:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        handle.load_tensors(tensors, str(path))
    return handle


def _apply_resolved(model: nn.Module, method: str, cfg, names: list[str], collect_stats: bool) -> Adapters:
    session = Session(collect_stats)
    wrappers = _build(model, method, cfg, names, session)  # every check passes before the model changes
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for name, w in wrappers.items():
        parent, child = _parent(model, name)
        setattr(parent, child, w)
    handle = Adapters(model, method, cfg, names, session, wrappers, requires_grad)
    setattr(model, ATTR, handle)
    return handle


def merge(model: nn.Module | Adapters) -> nn.Module:
    """Fold single-adapter updates (LoRA, MHR-μ) into the base weights; returns the plain model."""
    return adapters_of(model).merge()


def convert(model: nn.Module | Adapters, to: str) -> Adapters:
    """From applied Poly/MHR adapters: ``mhr_z`` (skills frozen, only the routing logits train) or ``mhr_mu``
    (one LoRA per layer, the uniform average of the skills)."""
    handle = adapters_of(model)
    if handle.method not in ("poly", "mhr", "mhr_z") or to not in ("mhr_z", "mhr_mu"):
        raise AdapterError(f"convert goes from poly/mhr adapters to 'mhr_z' or 'mhr_mu'; got {handle.method!r} -> "
                           f"{to!r}")
    if to == "mhr_z":
        for w in handle.wrappers.values():
            w.adapter.skills_A.requires_grad_(False)
            w.adapter.skills_B.requires_grad_(False)
        handle.method = "mhr_z"
        handle.config = MHRConfig(**{**to_dict(handle.config), "train_skills": False})
        return handle
    for w in handle.wrappers.values():
        w.adapter = mhr_mu_from(w.adapter).to(w.adapter.skills_A.device)
    handle.method = "mhr_mu"
    handle.config = LoRAConfig(rank=handle.config.rank, alpha=handle.config.alpha)
    return handle
