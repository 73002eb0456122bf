"""Finding the modules a method adapts, and building their wrappers (nothing in the model changes here)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

from .core import AdaptedFFN, AdaptedLinear, AdapterError, Session, check_rank, ffn_weights
from .mixlora import MixLoRA
from .registry import available, method_spec

__all__ = ["build", "matches", "parent", "resolve_targets", "shape"]


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def _overlaps(name: str, wrapped: str) -> bool:
    """``name`` is, lies inside, or contains the already-adapted module ``wrapped``."""
    return name == wrapped or name.startswith(wrapped + ".") or wrapped.startswith(name + ".")


def resolve_targets(model: nn.Module, method: str, kind: str, targets: Iterable[str] | None,
                    adapted: dict[str, str] | None = None) -> list[str]:
    """The names of the modules ``targets`` selects. ``adapted`` (``{module name: method}``) are modules already
    wrapped by another method: a module that is one of them, lies inside one or contains one is never chosen
    (an adapter inside MixLoRA's frozen FFN would be bypassed)."""
    targets = list(targets) if targets is not None else list(method_spec(method).targets)
    if isinstance(targets, str) or not targets:
        raise AdapterError(f"targets={targets!r} must be a non-empty list of module names or patterns")
    adapted = adapted or {}
    if kind == "linear":
        candidates = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, AdaptedLinear))]
        what = "nn.Linear"
    else:
        candidates = [n for n, m in model.named_modules()
                      if n and (isinstance(m, AdaptedFFN) or ffn_weights(m) is not None)]
        what = "feed-forward (moekit FeedForward or a gate_proj/up_proj/down_proj MLP)"
    chosen = [n for n in candidates if any(matches(n, t) for t in targets)]
    free = [n for n in chosen if not any(_overlaps(n, w) for w in adapted)]
    if chosen and not free:
        taken = sorted({m for w, m in adapted.items() if any(_overlaps(n, w) for n in chosen)})
        raise AdapterError(f"targets {targets} match only modules that are already adapted: the model already has "
                           f"{', '.join(taken)} adapters on {chosen[:4]}; choose other targets, or merge()/remove() "
                           f"those adapters first")
    if not free and kind == "ffn":
        _refuse_routed_experts(model, method, targets, candidates)
    if not free:
        free_candidates = [n for n in candidates if not any(_overlaps(n, w) for w in adapted)]
        raise AdapterError(f"targets {targets} match no {what} module of the model; {method} adapts {what} "
                           f"modules such as {free_candidates[:6]}")
    return free


def _refuse_routed_experts(model: nn.Module, method: str, targets: list[str], dense: list[str]) -> None:
    """MixLoRA on MoE layers: the paper (§15) builds LoRA experts over one frozen *dense* feed-forward; a MoE
    layer's routed experts already are a mixture with a trained router, and the paper defines no nesting, so
    moekit refuses (one line naming what does work) rather than inventing one. The dense feed-forwards inside a
    MoE model (shared experts, dense layers) take MixLoRA as usual."""
    from ..experts import ExpertBank
    routed = [n for n, m in model.named_modules() if n and any(matches(n, t) for t in targets)
              and any(isinstance(c, ExpertBank) for c in m.modules())]
    if not routed:
        return
    linear = [m for m in available() if method_spec(m).kind == "linear"]
    dense_hint = (f"its dense feed-forwards with targets={sorted({n.rpartition('.')[2] for n in dense})} "
                  f"(e.g. {dense[:3]}), or " if dense else "")
    raise AdapterError(f"targets {targets} match MoE layers {routed[:3]} whose routed experts are already a "
                       f"mixture: {method} (MixLoRA, spec §15) builds LoRA experts over a frozen dense feed-forward "
                       f"and is not defined over routed experts; on this model adapt {dense_hint}the attention "
                       f"projections with a linear method ({', '.join(linear)}; targets w_qkv,w_out)")


def parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def shape(module: nn.Module) -> list[int]:
    """``[out, in]`` of a linear map; ``[F, D, gated]`` of a feed-forward."""
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features]
    weights = ffn_weights(module)
    assert weights is not None
    return [weights.hidden_dim, weights.dim, int(weights.w_gate is not None)]


def build(model: nn.Module, method: str, config: Any, names: list[str], session: Session) -> dict[str, Any]:
    """The wrappers of ``names`` (checked: ranks within the adapted maps' dimensions); the model is not touched."""
    spec = method_spec(method)
    built: dict[str, Any] = {}
    for name in names:
        module: Any = model.get_submodule(name)
        if spec.kind == "linear":
            assert spec.build is not None
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
