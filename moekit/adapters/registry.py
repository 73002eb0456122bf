"""The adapter methods: how each is configured and built, what it wraps, its default targets, whether it merges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..configs import from_dict
from .core import AdapterError
from .flylora import FlyLoRA, FlyLoRAConfig
from .glider import Glider, GliderConfig
from .lora import LoRA, LoRAConfig
from .mhr import MHR, MHRConfig
from .mixlora import MixLoRAConfig
from .mome import MoME, MoMEConfig
from .mos import MoS, MoSConfig, pool_for
from .rank1 import Rank1Config, Rank1Experts
from .routed import DynMoLE, DynMoLEConfig, LoRAMixer, LoRAMixerConfig
from .sema import SEMA, SEMAConfig

__all__ = ["CONVERTED", "METHODS", "Method", "available", "make_config", "method_spec", "mergeable_methods"]


@dataclass(frozen=True)
class Method:
    """How a method is built: its config class, what it wraps (``linear`` or ``ffn``) and default targets.
    ``build(in_features, out_features, config, session)`` makes a linear adapter (``None`` for ``ffn`` methods,
    which :func:`moekit.adapters.targets.build` makes from the feed-forward's weights)."""

    config: type
    kind: str
    build: Callable[..., nn.Module] | None
    targets: tuple[str, ...]
    mergeable: bool = False


_LINEAR_TARGETS = ("w_qkv", "w_out", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")
_FFN_TARGETS = ("ffn", "mlp")

METHODS: dict[str, Method] = {
    "lora": Method(LoRAConfig, "linear", lambda i, o, c, s: LoRA(i, o, c), _LINEAR_TARGETS, mergeable=True),
    "mixlora": Method(MixLoRAConfig, "ffn", None, _FFN_TARGETS),
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
CONVERTED: dict[str, Method] = {
    "mhr_z": Method(MHRConfig, "linear", lambda i, o, c, s: MHR(i, o, c, lambda: s.task), _LINEAR_TARGETS),
    "mhr_mu": Method(LoRAConfig, "linear", lambda i, o, c, s: LoRA(i, o, c), _LINEAR_TARGETS, mergeable=True),
}


def available() -> list[str]:
    """The method names :func:`moekit.adapters.apply` accepts (``mhr_z`` and ``mhr_mu`` come from ``convert``)."""
    return list(METHODS)


def mergeable_methods() -> list[str]:
    return [n for n, m in {**METHODS, **CONVERTED}.items() if m.mergeable]


def method_spec(name: str) -> Method:
    found = METHODS.get(name) or CONVERTED.get(name)
    if found is None:
        raise AdapterError(f"unknown adapter method {name!r}; choose one of {available()}")
    return found


def make_config(method: str, options: dict[str, Any]) -> Any:
    """The method's frozen config from ``options`` (unknown keys are refused, the nearest one suggested)."""
    cls = method_spec(method).config
    if method == "poly" and options.get("num_heads", 1) not in (1, "1"):
        raise AdapterError(f"poly is MHR with one head; got num_heads={options['num_heads']!r} (use method "
                           f"'mhr' for several heads)")
    if method == "mhr" and "num_heads" not in options:
        options = {**options, "num_heads": 4}
    return from_dict(cls, options, prefix=method)
