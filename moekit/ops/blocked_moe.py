"""The dropless MoE computation over expert-sorted assignments, one expert segment (or block of rows) at a time.

Dim legend: T tokens, D model dim, N valid assignments (sorted by expert), F expert hidden dim, E experts,
n rows of one block (at most ``block_rows`` consecutive assignments of one expert).

Computes exactly what :func:`moekit.ops.sorted_moe_ffn` computes,
``y_t = sum_n [token_n = t] * weights_n * (w_down[e_n] @ act(w_gate[e_n] @ x_t + b_gate[e_n],
w_up[e_n] @ x_t + b_up[e_n]) + b_down[e_n])``, but in a different order: instead of whole-``N`` passes (gather
all ``N x D`` rows, all gate/up products, the activation over ``N x F``, all down products, one scatter), each
block of rows goes through gather -> gate/up products -> activation -> down product -> weighted scatter-add
while it is still in the CPU's cache. On a CPU the whole-``N`` passes of :func:`sorted_moe_ffn` are
memory-bound and, for many small experts (issue 20's ``fine-s``: 64 experts, top-8, ``N = 8 T``), they move
several ``N x D`` buffers through main memory that the dense-equivalent layer never has.

Backward does the same per block: the output gradient's rows are gathered per block, the hidden activation
``a = act(h_gate, h_up)`` is recomputed from the saved gate/up products (one cheap elementwise pass on cached
rows) instead of being saved, so this function saves ``2 N F`` floats (``N F`` without a gate) where
:func:`sorted_moe_ffn` saves ``3 N F``; the input rows are gathered again from ``x_TD``. Weight gradients are
written in place into one ``[E, ...]`` buffer per weight (blocks after an expert's first accumulate with
``addmm_``; experts with no rows get zeros); the combine weights' gradient is ``<grad_y_t @ w_down[e], a_n>``
(+ ``<grad_y_t, b_down[e]>``), as in :func:`sorted_moe_ffn`.

The combine weights scale the narrower of the hidden activation (``n x F``) and the expert output (``n x D``):
``w * (W_down a) = W_down (w * a)``, and in backward ``(w * g).T @ a = g.T @ (w * a)``, so fine-grained experts
(``F <= D``) scale ``n x F`` values where the output would have ``n x D`` (not with a down bias, which the weights
must scale too).

Choices made (measured, ``docs/benchmarks.md``, ``benchmarks/engine_ab.py``): the engine
(``moekit.dispatch.sorted.BLOCK_ROWS``) runs one block per expert segment. On 2026-12-07 (idle, one thread, CPU
clock), forward+backward against the ``sorted`` op: 0.89x on the ``default`` preset's layer (32 experts x 128,
top-7, dim 256), 0.93x on ``fine-s``, 0.95x on 16 x 256 top-3, 1.01x on the coarse 8 x 512 top-2 and 1.02x on
``mixtral-s``; blocks of 512 rows were 2-5% slower than whole segments on every shape. With two threads (wall
clock): 1.00x, 0.98x and 1.00x on ``default``, ``fine-s`` and ``mixtral-s``. ``auto`` therefore runs it on CPU
for experts no wider than the model. ``block_rows`` (a positive int) still bounds a block for callers that want it.
Segment sizes arrive as a Python list: one host sync per layer, not per block.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..experts.activations import hidden, hidden_backward
from .sorted_moe import _expert_grad, _linear

__all__ = ["blocked_moe_ffn", "row_blocks"]


def row_blocks(counts: list[int], block_rows: int | None) -> Iterator[tuple[int, slice, bool]]:
    """``(expert, rows, first)`` for every non-empty expert's segment split into near-equal blocks of at most
    ``block_rows`` rows (``None``: one block per segment); ``first`` marks an expert's first block."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            parts = 1 if block_rows is None else -(-n // block_rows)
            size, extra = divmod(n, parts)
            s = start
            for i in range(parts):
                m = size + (i < extra)
                yield e, slice(s, s + m), i == 0
                s += m
        start += n


def _gather_buffer(src_TD: torch.Tensor, counts: list[int], block_rows: int | None) -> torch.Tensor:
    """One ``[rows of the largest block, D]`` buffer that every block's gathered rows are written into in turn, so
    the gather writes memory that is still in cache instead of a fresh allocation per block (measured: 0.5-2 % of
    the op on one thread, docs/benchmarks.md session 15)."""
    rows = max(counts, default=0)
    if block_rows is not None:
        rows = min(rows, block_rows)
    return src_TD.new_empty(rows, src_TD.shape[1])


def _gather(src_TD: torch.Tensor, tok_n: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``src_TD[tok_n]``, written into the first rows of ``buf``."""
    return torch.index_select(src_TD, 0, tok_n, out=buf[: tok_n.numel()])


def _scale_hidden(F_: int, D: int, b_down_ED: torch.Tensor | None) -> bool:
    """Whether the combine weights scale the hidden activation (``n x F``) rather than the expert output
    (``n x D``): the narrower of the two, when there is no down bias (which the weights must scale too)."""
    return F_ <= D and b_down_ED is None


def _weight_grad(g_nX: torch.Tensor, a_nY: torch.Tensor, out_XY: torch.Tensor, first: bool) -> None:
    """``out_XY (+)= g_nX.T @ a_nY``: written by an expert's first block, accumulated by the others."""
    if first:
        torch.mm(g_nX.t(), a_nY, out=out_XY)
    else:
        out_XY.addmm_(g_nX.t(), a_nY)


class _BlockedMoEFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_N, token_N, w_gate_EFD, w_up_EFD, w_down_EDF, b_gate_EF, b_up_EF, b_down_ED,
                counts, activation, block_rows):
        N, F_ = token_N.numel(), w_up_EFD.shape[1]
        h_up_NF = x_TD.new_empty(N, F_)
        h_gate_NF = x_TD.new_empty(N, F_) if w_gate_EFD is not None else None
        w_N1 = weights_N.to(x_TD.dtype)[:, None]
        scale_hidden = _scale_hidden(F_, x_TD.shape[1], b_down_ED)
        y_TD = torch.zeros_like(x_TD)
        gather_buf = _gather_buffer(x_TD, counts, block_rows)
        for e, rows, _ in row_blocks(counts, block_rows):
            tok_n = token_N[rows]
            x_nD = _gather(x_TD, tok_n, gather_buf)
            h_up_nF = _linear(x_nD, w_up_EFD[e], b_up_EF, e, h_up_NF[rows])
            h_gate_nF = None if h_gate_NF is None else _linear(x_nD, w_gate_EFD[e], b_gate_EF, e, h_gate_NF[rows])
            a_nF = hidden(activation, h_gate_nF, h_up_nF)  # a fresh buffer: scaled in place below when narrower
            if scale_hidden:  # w * (W_down a) = W_down (w * a)
                out_nD = _linear(a_nF.mul_(w_N1[rows]), w_down_EDF[e], None, e, out=x_nD)
            else:
                out_nD = _linear(a_nF, w_down_EDF[e], b_down_ED, e, out=x_nD).mul_(w_N1[rows])
            y_TD.index_add_(0, tok_n, out_nD)  # (out_nD reuses x_nD's buffer: the products above have read it)
        ctx.save_for_backward(x_TD, weights_N, token_N, w_gate_EFD, w_up_EFD, w_down_EDF, b_down_ED, h_gate_NF,
                              h_up_NF)
        ctx.counts, ctx.activation, ctx.block_rows = counts, activation, block_rows
        ctx.has_bias = (b_gate_EF is not None, b_up_EF is not None, b_down_ED is not None)
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, weights_N, token_N, w_gate, w_up, w_down, b_down, h_gate_NF, h_up_NF = ctx.saved_tensors
        counts, activation = ctx.counts, ctx.activation
        need_x, need_w, _, need_gate, need_up, need_down = ctx.needs_input_grad[:6]
        need_bg, need_bu, need_bd = (has and need for has, need in zip(ctx.has_bias, ctx.needs_input_grad[6:9]))
        need_gate = need_gate and w_gate is not None
        grad_y_TD = grad_y_TD.contiguous()
        E, F_, D = w_up.shape
        grad_x = torch.zeros_like(x_TD) if need_x else None
        grad_weights = grad_y_TD.new_empty(token_N.numel()) if need_w else None
        grad_gate = _expert_grad(w_gate, counts) if need_gate else None
        grad_up = _expert_grad(w_up, counts) if need_up else None
        grad_down = _expert_grad(w_down, counts) if need_down else None
        grad_bg = h_up_NF.new_zeros(E, F_) if need_bg else None
        grad_bu = h_up_NF.new_zeros(E, F_) if need_bu else None
        grad_bd = grad_y_TD.new_zeros(E, D) if need_bd else None
        w_N1 = weights_N.to(grad_y_TD.dtype)[:, None]
        scale_hidden = _scale_hidden(F_, D, b_down)
        g_buf = _gather_buffer(grad_y_TD, counts, ctx.block_rows)
        x_buf = _gather_buffer(x_TD, counts, ctx.block_rows) if grad_up is not None or grad_gate is not None else None
        for e, rows, first in row_blocks(counts, ctx.block_rows):
            tok_n = token_N[rows]
            g_nD = _gather(grad_y_TD, tok_n, g_buf)
            h_up_nF = h_up_NF[rows]
            h_gate_nF = None if h_gate_NF is None else h_gate_NF[rows]
            # the hidden activation, recomputed from the cached gate/up rows (SwiGLU keeps silu(gate) for its
            # backward below rather than computing it twice)
            silu_nF = F.silu(h_gate_nF) if activation == "swiglu" else None
            a_nF = silu_nF * h_up_nF if silu_nF is not None else hidden(activation, h_gate_nF, h_up_nF)
            grad_a_nF = torch.mm(g_nD, w_down[e])  # unscaled: the combine weights' gradient comes from it
            if grad_weights is not None:
                gw_n = (grad_a_nF * a_nF).sum(-1)
                if b_down is not None:
                    gw_n += g_nD @ b_down[e]
                grad_weights[rows] = gw_n
            w_n1 = w_N1[rows]
            grad_a_nF.mul_(w_n1)
            if grad_down is not None and scale_hidden:  # (w * g).T @ a = g.T @ (w * a): scale the narrower
                _weight_grad(g_nD, a_nF.mul_(w_n1), grad_down[e], first)
            elif grad_down is not None or grad_bd is not None:
                g_nD.mul_(w_n1)
                if grad_down is not None:
                    _weight_grad(g_nD, a_nF, grad_down[e], first)
                if grad_bd is not None:
                    grad_bd[e] += g_nD.sum(0)
            if silu_nF is not None:  # = hidden_backward("swiglu", ...), reusing silu(gate)
                grad_up_nF = silu_nF.mul_(grad_a_nF)
                grad_gate_nF = torch.ops.aten.silu_backward(grad_a_nF.mul_(h_up_nF), h_gate_nF)
            else:
                grad_gate_nF, grad_up_nF = hidden_backward(activation, h_gate_nF, h_up_nF, grad_a_nF)
            if grad_bu is not None:
                grad_bu[e] += grad_up_nF.sum(0)
            if grad_bg is not None and grad_gate_nF is not None:
                grad_bg[e] += grad_gate_nF.sum(0)
            if grad_up is not None or grad_gate is not None:
                x_nD = _gather(x_TD, tok_n, x_buf)
                if grad_up is not None:
                    _weight_grad(grad_up_nF, x_nD, grad_up[e], first)
                if grad_gate is not None and grad_gate_nF is not None:
                    _weight_grad(grad_gate_nF, x_nD, grad_gate[e], first)
            if grad_x is not None:
                grad_x_nD = torch.mm(grad_up_nF, w_up[e], out=g_nD)  # g_nD is no longer needed
                if grad_gate_nF is not None:
                    grad_x_nD.addmm_(grad_gate_nF, w_gate[e])
                grad_x.index_add_(0, tok_n, grad_x_nD)
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights_N.dtype)
        return (grad_x, grad_weights, None, grad_gate, grad_up, grad_down, grad_bg, grad_bu, grad_bd,
                None, None, None)


def blocked_moe_ffn(
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
    block_rows: int | None = None,
) -> torch.Tensor:
    """``y_TD`` for assignments sorted by expert, block by block (same contract as
    :func:`moekit.ops.sorted_moe_ffn`): assignment ``n`` sends token ``token_N[n]`` to the expert whose segment
    holds ``n`` (``counts[e]`` consecutive assignments per expert) with weight ``weights_N[n]``.
    ``block_rows``: most rows per block (``None``, the default: one block per expert segment)."""
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"blocked_moe_ffn: block_rows must be a positive int or None, got {block_rows!r}")
    assert sum(counts) == token_N.numel() == weights_N.numel(), "counts must cover every assignment"
    return _BlockedMoEFFN.apply(x_TD.contiguous(), weights_N, token_N, w_gate_EFD, w_up_EFD, w_down_EDF,
                                b_gate_EF, b_up_EF, b_down_ED, counts, activation, block_rows)
