"""The ``sorted_op`` engine: the ``sorted`` engine as one opaque ``torch.library`` custom op, for ``torch.compile``.

Dim legend: T tokens, D model dim, K slots per token, E experts, F expert hidden dim.

Why: the ``sorted`` engine reads its per-expert segment sizes on the host (``bincount(...).tolist()``), which
``torch.compile(fullgraph=True)`` cannot trace (a data-dependent graph break). Here the whole sorted
computation is the custom op ``moekit::sorted_moe``: the compiler sees one node whose output has the shape and
dtype of ``x_TD`` (its fake implementation), and runs the eager sorted engine inside it. The op's backward is
the custom op ``moekit::sorted_moe_backward``, which recomputes the forward under autograd and runs the
sorted engine's hand-written backward: one extra expert forward per backward, in exchange for a graph with no
break inside the MoE layer. Outputs and gradients equal the ``sorted`` engine's (tested against
``reference``).

``engine="auto"`` picks this engine while ``torch.compile`` traces (it prefers compile-friendly engines) and
the plain ``sorted`` engine when running eagerly; ``engine="sorted_op"`` forces it.
"""

from __future__ import annotations

import torch

from ..experts import ExpertBank
from ..ops import sorted_moe_ffn
from ..types import Routing
from .registry import register_engine
from .sorted import _sort, sorted_engine

__all__ = ["sorted_moe_op", "sorted_op_engine"]


class _Bank:
    """The attributes of an :class:`ExpertBank` that :func:`sorted_engine` reads, from plain tensors."""

    def __init__(self, w_gate, w_up, w_down, b_gate, b_up, b_down, activation: str) -> None:
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.b_gate, self.b_up, self.b_down = b_gate, b_up, b_down
        self.activation, self.num_experts = activation, w_up.shape[0]


def _routing(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> Routing:
    empty = weights_TK.new_empty(0, 0)  # the engine reads only the ids and weights
    return Routing(expert_ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=empty, logits_TE=empty)


@torch.library.custom_op("moekit::sorted_moe", mutates_args=())
def sorted_moe_op(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                  w_gate_EFD: torch.Tensor | None, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                  b_gate_EF: torch.Tensor | None, b_up_EF: torch.Tensor | None, b_down_ED: torch.Tensor | None,
                  activation: str) -> torch.Tensor:
    """``y_TD = sum_k weights_tk * E_{ids_tk}(x_t)`` by the sorted engine (eager inside the op)."""
    bank = _Bank(w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF, b_up_EF, b_down_ED, activation)
    return sorted_engine(x_TD, _routing(ids_TK, weights_TK), bank)


@sorted_moe_op.register_fake
def _sorted_moe_fake(x_TD, ids_TK, weights_TK, w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF, b_up_EF, b_down_ED,
                     activation):
    return torch.empty_like(x_TD)


_DIFFERENTIABLE = (0, 2, 3, 4, 5, 6, 7, 8)  # argument positions with a gradient (not the ids, not activation)


@torch.library.custom_op("moekit::sorted_moe_backward", mutates_args=())
def sorted_moe_backward(grad_y_TD: torch.Tensor, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                        weights_TK: torch.Tensor, w_gate_EFD: torch.Tensor | None, w_up_EFD: torch.Tensor,
                        w_down_EDF: torch.Tensor, b_gate_EF: torch.Tensor | None, b_up_EF: torch.Tensor | None,
                        b_down_ED: torch.Tensor | None, activation: str) -> list[torch.Tensor]:
    """Gradients of ``x, weights, w_gate, w_up, w_down, b_gate, b_up, b_down`` (an absent input: empty tensor).

    Inside a custom op the autograd dispatch key is excluded, so ops other than an ``autograd.Function`` record
    no graph: the leaves are therefore the exact inputs of :func:`sorted_moe_ffn` (the combine weights already
    gathered into sorted order), and the weights' gradient is scattered back to ``[T, K]`` by hand.
    """
    K = ids_TK.shape[1]
    _, order_N, counts_t = _sort(_routing(ids_TK, weights_TK), w_up_EFD.shape[0])
    counts = counts_t.tolist()
    valid_N = order_N[counts[0]:]
    weights = [w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF, b_up_EF, b_down_ED]
    with torch.enable_grad():
        x = x_TD.detach().requires_grad_()
        weights_N = weights_TK.reshape(-1)[valid_N].detach().requires_grad_()
        leaves = [w.detach().requires_grad_() if w is not None else None for w in weights]
        w_up, w_down = leaves[1], leaves[2]
        assert w_up is not None and w_down is not None  # required arguments of the op
        y_TD = sorted_moe_ffn(x, weights_N, valid_N // K, counts[1:], leaves[0], w_up, w_down, activation,
                              leaves[3], leaves[4], leaves[5])
        wanted = [x, weights_N] + [w for w in leaves if w is not None]
        grads = iter(torch.autograd.grad(y_TD, wanted, grad_y_TD, allow_unused=True))
    grad_x, grad_weights_N = next(grads), next(grads)
    grad_weights_TK = torch.zeros_like(weights_TK)
    if grad_weights_N is not None:
        grad_weights_TK.view(-1)[valid_N] = grad_weights_N
    out = [grad_x if grad_x is not None else torch.zeros_like(x_TD), grad_weights_TK]
    for w in weights:
        g = next(grads) if w is not None else None
        out.append(g if g is not None else (torch.zeros_like(w) if w is not None else x_TD.new_empty(0)))
    return out


@sorted_moe_backward.register_fake
def _sorted_moe_backward_fake(grad_y_TD, x_TD, ids_TK, weights_TK, w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF,
                              b_up_EF, b_down_ED, activation):
    args = [x_TD, ids_TK, weights_TK, w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF, b_up_EF, b_down_ED]
    return [torch.empty_like(args[i]) if args[i] is not None else x_TD.new_empty(0) for i in _DIFFERENTIABLE]


def _setup_context(ctx, inputs, output) -> None:
    ctx.activation = inputs[-1]
    ctx.present = [t is not None for t in inputs[:-1]]
    ctx.save_for_backward(*[t for t in inputs[:-1] if t is not None])


def _backward(ctx, grad_y_TD):
    saved = iter(ctx.saved_tensors)
    args = [next(saved) if present else None for present in ctx.present]
    grads = sorted_moe_backward(grad_y_TD.contiguous(), *args, ctx.activation)
    out: list[torch.Tensor | None] = [None] * 10
    for i, g in zip(_DIFFERENTIABLE, grads):
        out[i] = g if args[i] is not None else None
    return tuple(out)


sorted_moe_op.register_autograd(_backward, setup_context=_setup_context)


@register_engine("sorted_op", priority=5, compile_friendly=True)  # eagerly, ``auto`` prefers plain ``sorted``
def sorted_op_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """The sorted engine behind one custom op: no graph break under ``torch.compile(fullgraph=True)``."""
    return sorted_moe_op(x_TD, routing.expert_ids_TK, routing.weights_TK.to(x_TD.dtype), bank.w_gate, bank.w_up,
                         bank.w_down, bank.b_gate, bank.b_up, bank.b_down, bank.activation)
