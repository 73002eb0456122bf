"""Expert FFN over tokens already sorted by expert, with a hand-written backward.

Dim legend: N assignments (rows sorted by expert), D model dim, F expert hidden dim, E experts.

Why a custom autograd function: slicing ``w[e]`` of a stacked ``[E, ...]`` parameter inside an autograd graph
makes autograd build (and add up) a full-size zero gradient of the whole stack for every slice, which costs
about 40% of a layer's backward on CPU (BENCHMARKS.md). Here each expert's weight gradient is written in place
into one preallocated ``[E, ...]`` buffer, and the gate/up products are saved from forward rather than
recomputed. Expert segment sizes arrive as a Python list (one host sync per layer, not per expert).
"""

from __future__ import annotations

import torch

from ..experts.activations import hidden, hidden_backward

__all__ = ["expert_ffn"]


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, counts, activation, b_gate_EF, b_up_EF, b_down_ED):
        N, F = x_ND.shape[0], w_up_EFD.shape[1]
        h_up_NF = x_ND.new_empty(N, F)
        h_gate_NF = x_ND.new_empty(N, F) if w_gate_EFD is not None else None
        for e, seg in _segments(counts):
            torch.mm(x_ND[seg], w_up_EFD[e].t(), out=h_up_NF[seg])
            if b_up_EF is not None:
                h_up_NF[seg] += b_up_EF[e]
            if h_gate_NF is not None:
                torch.mm(x_ND[seg], w_gate_EFD[e].t(), out=h_gate_NF[seg])
                if b_gate_EF is not None:
                    h_gate_NF[seg] += b_gate_EF[e]
        a_NF = hidden(activation, h_gate_NF, h_up_NF)
        out_ND = x_ND.new_empty(N, w_down_EDF.shape[1])
        for e, seg in _segments(counts):
            torch.mm(a_NF[seg], w_down_EDF[e].t(), out=out_ND[seg])
            if b_down_ED is not None:
                out_ND[seg] += b_down_ED[e]
        ctx.save_for_backward(x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, h_gate_NF, h_up_NF, a_NF)
        ctx.counts, ctx.activation = counts, activation
        ctx.has_bias = (b_gate_EF is not None, b_up_EF is not None, b_down_ED is not None)
        return out_ND

    @staticmethod
    def backward(ctx, grad_out_ND):
        x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, h_gate_NF, h_up_NF, a_NF = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad[:4]
        grad_out_ND = grad_out_ND.contiguous()
        segments = list(_segments(counts))
        empty = [e for e, n in enumerate(counts) if n == 0]

        def weight_grad(w):
            g = w.new_empty(w.shape)  # contiguous even when ``w`` is a strided view of a checkpoint tensor
            if empty:
                g[empty] = 0
            return g

        grad_a_NF = torch.empty_like(a_NF)
        grad_down = weight_grad(w_down_EDF) if need_down else None
        for e, seg in segments:
            torch.mm(grad_out_ND[seg], w_down_EDF[e], out=grad_a_NF[seg])
            if need_down:
                torch.mm(grad_out_ND[seg].t(), a_NF[seg], out=grad_down[e])
        grad_gate_NF, grad_up_NF = hidden_backward(activation, h_gate_NF, h_up_NF, grad_a_NF)
        grad_x = torch.empty_like(x_ND) if need_x else None
        grad_gate = weight_grad(w_gate_EFD) if need_gate and w_gate_EFD is not None else None
        grad_up = weight_grad(w_up_EFD) if need_up else None
        for e, seg in segments:
            if grad_up is not None:
                torch.mm(grad_up_NF[seg].t(), x_ND[seg], out=grad_up[e])
            if grad_gate is not None:
                torch.mm(grad_gate_NF[seg].t(), x_ND[seg], out=grad_gate[e])
            if grad_x is not None:
                torch.mm(grad_up_NF[seg], w_up_EFD[e], out=grad_x[seg])
                if grad_gate_NF is not None:
                    grad_x[seg].addmm_(grad_gate_NF[seg], w_gate_EFD[e])
        grad_biases = [None, None, None]
        for i, (has, g_NX) in enumerate(zip(ctx.has_bias, (grad_gate_NF, grad_up_NF, grad_out_ND))):
            if has and ctx.needs_input_grad[6 + i]:
                grad_biases[i] = _segment_sums(g_NX, counts)
        return grad_x, grad_gate, grad_up, grad_down, None, None, *grad_biases


def _segment_sums(g_NX: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert column sums of rows sorted by expert: the gradient of a per-expert bias."""
    out_EX = g_NX.new_zeros(len(counts), g_NX.shape[1])
    for e, seg in _segments(counts):
        torch.sum(g_NX[seg], dim=0, out=out_EX[e])
    return out_EX


def expert_ffn(
    x_ND: torch.Tensor,
    w_gate_EFD: torch.Tensor | None,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    counts: list[int],
    activation: str,
    b_gate_EF: torch.Tensor | None = None,
    b_up_EF: torch.Tensor | None = None,
    b_down_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply expert ``e`` to its contiguous segment of ``x_ND`` (``counts[e]`` rows, in expert order).

    Rows past ``sum(counts)`` are not allowed; every row belongs to one expert. The optional per-expert
    biases are added after the matching projection.
    """
    assert sum(counts) == x_ND.shape[0], "counts must cover every row"
    return _ExpertFFN.apply(x_ND.contiguous(), w_gate_EFD, w_up_EFD, w_down_EDF, counts, activation,
                            b_gate_EF, b_up_EF, b_down_ED)
