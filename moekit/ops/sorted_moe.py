"""The whole dropless MoE computation over expert-sorted assignments, with a hand-written backward.

Dim legend: T tokens, D model dim, N valid assignments (sorted by expert), F expert hidden dim, E experts.

``y_t = sum_n [token_n = t] * weights_n * (w_down[e_n] @ act(w_gate[e_n] @ x_t + b_gate[e_n],
w_up[e_n] @ x_t + b_up[e_n]) + b_down[e_n])``, the per-expert biases optional (GPT-OSS, split BERT FFNs).

Why one autograd function for gather, experts and weighted scatter:
- slicing ``w[e]`` of a stacked ``[E, ...]`` parameter inside autograd builds a full-size zero gradient of the
  whole stack per slice (about 40% of a CPU backward, BENCHMARKS.md); here each expert's weight gradient is
  written in place into one ``[E, ...]`` buffer (experts with no tokens get zeros);
- nothing of size ``N x D`` is saved for backward: the gathered input is gathered again from ``x_TD`` (which
  the router keeps anyway), and the combine weights' gradient ``<grad_y_t, out_n>`` is computed as
  ``<grad_y_t @ w_down[e], a_n>`` over the ``N x F`` products that backward computes anyway;
- the gate/up products are saved from forward rather than recomputed.
Segment sizes arrive as a Python list: one host sync per layer, not per expert.
"""

from __future__ import annotations

import torch

from ..experts.activations import hidden, hidden_backward

__all__ = ["sorted_moe_ffn"]


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _linear(x: torch.Tensor, w: torch.Tensor, b_EX: torch.Tensor | None, e: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b_EX[e])``, written into ``out`` when given."""
    if b_EX is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b_EX[e], x, w.t(), out=out)


def _segment_sums(g_NX: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert column sums of rows sorted by expert: the gradient of a per-expert bias."""
    out_EX = g_NX.new_zeros(len(counts), g_NX.shape[1])
    for e, seg in _segments(counts):
        torch.sum(g_NX[seg], dim=0, out=out_EX[e])
    return out_EX


def _expert_grad(w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    grad = w.new_empty(w.shape)  # contiguous even when ``w`` is a strided view (e.g. of a checkpoint tensor)
    empty = [e for e, n in enumerate(counts) if n == 0]
    if empty:
        grad[empty] = 0
    return grad


class _SortedMoEFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_N, token_N, w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF, b_up_EF, b_down_ED,
                counts, activation):
        x_ND = x_TD.index_select(0, token_N)  # (much faster than advanced indexing on CPU)
        N, F = token_N.numel(), w_up_EFD.shape[1]
        h_up_NF = x_TD.new_empty(N, F)
        h_gate_NF = x_TD.new_empty(N, F) if w_gate_EFD is not None else None
        for e, seg in _segments(counts):
            _linear(x_ND[seg], w_up_EFD[e], b_up_EF, e, h_up_NF[seg])
            if h_gate_NF is not None:
                _linear(x_ND[seg], w_gate_EFD[e], b_gate_EF, e, h_gate_NF[seg])
        a_NF = hidden(activation, h_gate_NF, h_up_NF)
        out_ND = x_ND  # reuse the gathered input's buffer: the gate/up products above have read all of it
        for e, seg in _segments(counts):
            _linear(a_NF[seg], w_down_EDF[e], b_down_ED, e, out_ND[seg])  # in place: no temporary, no copy
        out_ND.mul_(weights_N.to(out_ND.dtype)[:, None])
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, out_ND)
        ctx.save_for_backward(x_TD, weights_N, token_N, w_gate_EFD, w_up_EFD, w_down_EDF, b_down_ED, h_gate_NF,
                              h_up_NF, a_NF)
        ctx.counts, ctx.activation = counts, activation
        ctx.has_bias = (b_gate_EF is not None, b_up_EF is not None, b_down_ED is not None)
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, weights_N, token_N, w_gate, w_up, w_down, b_down, h_gate_NF, h_up_NF, a_NF = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        need_x, need_w, _, need_gate, need_up, need_down = ctx.needs_input_grad[:6]
        need_biases = [has and need for has, need in zip(ctx.has_bias, ctx.needs_input_grad[6:9])]
        segments = list(_segments(counts))
        grad_ND = grad_y_TD.contiguous().index_select(0, token_N)
        # unscaled gradient of the hidden activation, then the combine weights' gradient from it
        grad_a_NF = torch.empty_like(a_NF)
        for e, seg in segments:
            torch.mm(grad_ND[seg], w_down[e], out=grad_a_NF[seg])
        grad_weights = None
        if need_w:  # <grad_y_t, out_n> = <grad_y_t @ w_down[e], a_n> (+ <grad_y_t, b_down[e]>)
            grad_weights = (grad_a_NF * a_NF).sum(-1)
            if b_down is not None:
                for e, seg in segments:
                    grad_weights[seg] += grad_ND[seg] @ b_down[e]
            grad_weights = grad_weights.to(weights_N.dtype)
        w_N1 = weights_N.to(grad_ND.dtype)[:, None]
        grad_a_NF.mul_(w_N1)
        grad_down = None
        if need_down or need_biases[2]:
            grad_ND.mul_(w_N1)
        if need_down:
            grad_down = _expert_grad(w_down, counts)
            for e, seg in segments:
                torch.mm(grad_ND[seg].t(), a_NF[seg], out=grad_down[e])
        grad_gate_NF, grad_up_NF = hidden_backward(activation, h_gate_NF, h_up_NF, grad_a_NF)
        # before grad_ND's buffer is reused for grad_x below
        grad_biases = [_segment_sums(g_NX, counts) if need else None
                       for need, g_NX in zip(need_biases, (grad_gate_NF, grad_up_NF, grad_ND))]
        x_ND = x_TD.index_select(0, token_N)  # (much faster than advanced indexing on CPU)
        grad_up = _expert_grad(w_up, counts) if need_up else None
        grad_gate = _expert_grad(w_gate, counts) if need_gate and w_gate is not None else None
        grad_x_ND = grad_ND if need_x else None  # grad_ND is no longer needed: reuse its buffer
        for e, seg in segments:
            if grad_up is not None:
                torch.mm(grad_up_NF[seg].t(), x_ND[seg], out=grad_up[e])
            if grad_gate is not None:
                torch.mm(grad_gate_NF[seg].t(), x_ND[seg], out=grad_gate[e])
            if grad_x_ND is not None:
                torch.mm(grad_up_NF[seg], w_up[e], out=grad_x_ND[seg])
                if grad_gate_NF is not None:
                    grad_x_ND[seg].addmm_(grad_gate_NF[seg], w_gate[e])
        grad_x = torch.zeros_like(x_TD).index_add_(0, token_N, grad_x_ND) if need_x else None
        return (grad_x, grad_weights, None, grad_gate, grad_up, grad_down, *grad_biases, None, None)


def sorted_moe_ffn(
    x_TD: torch.Tensor,
    weights_N: torch.Tensor,
    token_N: torch.Tensor,
    counts: list[int],
    w_gate_EFD: torch.Tensor | None,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    activation: str,
    b_gate_EF: torch.Tensor | None = None,
    b_up_EF: torch.Tensor | None = None,
    b_down_ED: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_TD`` for assignments sorted by expert: assignment ``n`` sends token ``token_N[n]`` to the expert
    whose segment holds ``n`` (``counts[e]`` consecutive assignments per expert) with weight ``weights_N[n]``.
    """
    assert sum(counts) == token_N.numel() == weights_N.numel(), "counts must cover every assignment"
    return _SortedMoEFFN.apply(x_TD.contiguous(), weights_N, token_N, w_gate_EFD, w_up_EFD, w_down_EDF,
                               b_gate_EF, b_up_EF, b_down_ED, counts, activation)
