"""Routing analysis: record where every token goes in every MoE layer, then summarise.

Dim legend: T tokens, K experts per token, E experts, L layers.

:func:`trace_routing` hooks every :class:`~moekit.Router` that sits in a :class:`~moekit.MoE` (moekit's own
models and transformers models patched by :func:`moekit.hf.patch` alike) and keeps, per layer, the chosen
experts ``ids_TK`` and each token's routing entropy. :func:`summarize` turns a trace into a
:class:`RoutingReport`: per-layer load, load CV, entropies, dead experts, expert co-activation, and which
tokens each expert receives most selectively.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import MoE
from ..routing import Router
from ..types import Routing

__all__ = ["RoutingTrace", "LayerReport", "RoutingReport", "trace_routing", "summarize"]


@dataclass
class RoutingTrace:
    """Routing decisions gathered over forward passes, per layer, on CPU.

    Attributes:
        ids: layer name -> list of ``[T, K]`` int64 expert ids (``-1`` = empty slot), one per router call.
        entropy: layer name -> list of ``[T]`` per-token routing entropies normalised by ``log E``.
        num_experts: layer name -> E.
        tokens: list of ``[T]`` token ids, one per forward pass (filled by the caller, may stay empty).
    """

    ids: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    entropy: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    num_experts: dict[str, int] = field(default_factory=dict)
    tokens: list[torch.Tensor] = field(default_factory=list)

    def layer_ids(self, layer: str) -> torch.Tensor:
        return torch.cat(self.ids[layer])

    def token_ids(self) -> torch.Tensor | None:
        return torch.cat(self.tokens) if self.tokens else None


def _layer_names(model: nn.Module) -> dict[Router, str]:
    moes = [(path, m) for path, m in model.named_modules() if isinstance(m, MoE)]
    names = [m.name for _, m in moes]
    unique = len(set(names)) == len(names)
    return {m.router: (m.name if unique else path) for path, m in moes}


@contextlib.contextmanager
def trace_routing(model: nn.Module, keep: Callable[[], torch.Tensor | None] | None = None
                  ) -> Iterator[RoutingTrace]:
    """Record the routing of every MoE layer of ``model`` during a ``with`` body.

    Args:
        keep: optional callable returning a ``[T]`` bool mask of the tokens of the current forward to keep
            (e.g. not padding); read at each router call.

    Raises:
        ValueError: the model has no moekit MoE layer (patch a transformers model first).
    """
    trace = RoutingTrace()
    routers = _layer_names(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layer; for a transformers model call "
                         f"moekit.hf.patch(model) first")

    def hook(router: Router, args, routing: Routing) -> None:
        name = routers[router]
        ids_TK = routing.expert_ids_TK.detach()
        probs_TE = routing.scores_TE.detach().float()
        probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1)
        E = probs_TE.shape[-1]
        entropy_T = entropy_T / math.log(E) if E > 1 else entropy_T
        mask = keep() if keep is not None else None
        if mask is not None and mask.numel() == ids_TK.shape[0]:
            ids_TK, entropy_T = ids_TK[mask], entropy_T[mask]
        trace.ids.setdefault(name, []).append(ids_TK.cpu())
        trace.entropy.setdefault(name, []).append(entropy_T.cpu())
        trace.num_experts[name] = E

    handles = [router.register_forward_hook(hook) for router in routers]
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerReport:
    """Routing summary of one layer.

    Attributes:
        load_E: share of the assignments each expert received (sums to 1).
        coactivation_EE: fraction of tokens that used both expert i and expert j (diagonal: tokens using i).
        top_tokens: expert -> ``[(token, times sent to this expert, occurrences of the token)]``, the tokens
            this expert receives most selectively first (highest share of their occurrences).
    """

    name: str
    num_tokens: int
    load_E: torch.Tensor
    load_cv: float
    load_entropy: float
    token_entropy: float
    dead_experts: list[int]
    coactivation_EE: torch.Tensor
    top_tokens: dict[int, list[tuple[str, int, int]]]

    def row(self) -> dict[str, float]:
        return {"tokens": self.num_tokens, "load_cv": self.load_cv, "max_over_mean": self.max_over_mean,
                "load_entropy": self.load_entropy, "token_entropy": self.token_entropy,
                "dead_experts": len(self.dead_experts)}

    @property
    def max_over_mean(self) -> float:
        return float(self.load_E.max() * self.load_E.numel())


TABLE_NOTATION = """\
tokens: tokens routed through the layer. load_cv: coefficient of variation (sd / mean) of the experts' shares
of the assignments (0 = perfectly balanced). max_over_mean: the busiest expert's share over the mean share
(1 = balanced; E = one expert takes everything). load_entropy: entropy of the experts' shares divided by
ln E (1 = balanced, 0 = one expert). token_entropy: mean entropy of each token's routing probabilities
divided by ln E (0 = every token sure of its expert, 1 = uniform).
dead_experts: experts that received no token. Token table: 'tok' n/m = the token was sent to this expert n
times out of its m occurrences; the percentage is the expert's share of all assignments."""


@dataclass
class RoutingReport:
    layers: list[LayerReport]

    def table(self) -> str:
        """Fixed-width text table: one row per layer (counts as integers), then what each column means."""
        cols = ["tokens", "load_cv", "max_over_mean", "load_entropy", "token_entropy", "dead_experts"]
        counts = {"tokens", "dead_experts"}
        width = max([5] + [len(r.name) for r in self.layers])
        lines = ["layer".ljust(width) + "".join(f"{c:>15}" for c in cols)]
        for r in self.layers:
            row = r.row()
            lines.append(r.name.ljust(width) + "".join(f"{int(row[c]):>15,d}" if c in counts else f"{row[c]:>15.4f}"
                                                       for c in cols))
        return "\n".join(lines + ["", TABLE_NOTATION])

    def token_table(self, per_expert: int = 5) -> str:
        """Which tokens each expert receives most selectively, per layer."""
        lines = []
        for r in self.layers:
            lines.append(f"[{r.name}]")
            for e, toks in sorted(r.top_tokens.items()):
                shown = ", ".join(f"{t!r} {n}/{total}" for t, n, total in toks[:per_expert])
                lines.append(f"  expert {e:>3} ({r.load_E[e].item():6.1%}): {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"layers": [{"name": r.name, **r.row(), "load": r.load_E.tolist(), "dead": r.dead_experts,
                            "coactivation": r.coactivation_EE.tolist(),
                            "top_tokens": {str(e): t for e, t in r.top_tokens.items()}} for r in self.layers]}


def _coactivation(ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    onehot_TE = torch.zeros(ids_TK.shape[0], E + 1)
    onehot_TE.scatter_(1, ids_TK + 1, 1.0)  # empty slots land in column 0, dropped
    onehot_TE = onehot_TE[:, 1:]
    return onehot_TE.T @ onehot_TE / max(ids_TK.shape[0], 1)


def _top_tokens(ids_TK: torch.Tensor, tokens_T: torch.Tensor, E: int, decode: Callable[[int], str],
                per_expert: int, min_count: int) -> dict[int, list[tuple[str, int, int]]]:
    occurrences = Counter(tokens_T.tolist())
    pairs: Counter[tuple[int, int]] = Counter()
    for k in range(ids_TK.shape[1]):
        valid = ids_TK[:, k] >= 0
        pairs.update(zip(ids_TK[valid, k].tolist(), tokens_T[valid].tolist()))
    out: dict[int, list[tuple[int, int, int]]] = {e: [] for e in range(E)}
    for (e, tok), n in pairs.items():
        if occurrences[tok] >= min_count:
            out[e].append((tok, n, occurrences[tok]))
    most_selective = lambda r: (-r[1] / r[2], -r[1])  # noqa: E731
    return {e: [(decode(t), n, total) for t, n, total in sorted(v, key=most_selective)[:per_expert]]
            for e, v in out.items()}


def summarize(trace: RoutingTrace, decode: Callable[[int], str] | None = None, per_expert: int = 8,
              min_count: int = 3) -> RoutingReport:
    """A :class:`RoutingReport` from a trace (token lists need ``trace.tokens`` aligned with the layers)."""
    decode = decode or str
    tokens_T = trace.token_ids()
    layers = []
    for name, chunks in trace.ids.items():
        ids_TK = torch.cat(chunks)
        E = trace.num_experts[name]
        counts_E = torch.bincount(ids_TK.reshape(-1) + 1, minlength=E + 1)[1:].double()
        load_E = counts_E / counts_E.sum().clamp_min(1)
        share = load_E.clamp_min(1e-30)
        aligned = tokens_T is not None and tokens_T.numel() == ids_TK.shape[0]
        layers.append(LayerReport(
            name=name, num_tokens=ids_TK.shape[0], load_E=load_E,
            load_cv=float(counts_E.std(unbiased=False) / counts_E.mean()) if counts_E.mean() > 0 else 0.0,
            load_entropy=float(-(load_E * share.log()).sum() / math.log(E)) if E > 1 else 1.0,
            token_entropy=float(torch.cat(trace.entropy[name]).mean()),
            dead_experts=[int(e) for e in torch.nonzero(counts_E == 0).flatten()],
            coactivation_EE=_coactivation(ids_TK, E),
            top_tokens=_top_tokens(ids_TK, tokens_T, E, decode, per_expert, min_count)
            if aligned and tokens_T is not None else {}))
    return RoutingReport(layers)
