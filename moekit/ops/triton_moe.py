"""The dropless MoE computation as Triton kernels: grouped products over expert-sorted rows, with the gather
of token rows, the biases, the SwiGLU activation, the combine weights and the scatter back to token order
fused into the products (issue 20's GPU item: "fused permutation/gather, gate+up in one grouped GEMM, and a
Triton kernel where torch's grouped_mm leaves time on the table").

Dim legend: T tokens, D model dim, N = T*K assignment slots (sorted by expert; empty slots last), F expert
hidden dim, E experts, M row tiles.

Computes what :func:`moekit.ops.sorted_moe_ffn` computes,
``y_t = sum_n [token_n = t] * weights_n * (w_down[e_n] @ act(w_gate[e_n] @ x_t + b_gate[e_n],
w_up[e_n] @ x_t + b_up[e_n]) + b_down[e_n])``, with three kernels:

- :func:`_grouped_mm_kernel`: ``out[r] (+)= scale[r] * (A[gather(r)] @ W[e_r].T + bias[e_r])`` for every row ``r``
  of every expert's segment. Optional: gather of A's rows (tokens read straight from ``x_TD``, no ``N x D``
  copy), a second weight sharing A's tile (gate and up in one pass), the SwiGLU activation in the epilogue,
  and an atomic scatter-add of the rows into token order (no ``N x D`` output buffer, no index_add).
- :func:`_weight_grad_kernel`: ``dW[e] = sum_{r in segment e} (scale[r] * G[gather(r)]).T @ X[gather(r)]``,
  one program per (expert, output tile), looping over the segment; empty experts get zeros.
- The work list (:func:`tile_schedule`): every expert's segment cut into tiles of ``BM`` rows, built on the
  device from the per-expert counts (no host sync; ``M = ceil(N / BM) + E`` slots bound the tile count, and
  unused slots do nothing).

Backward saves the gate/up products (``2 N F``) and recomputes the activation from them, as
:func:`moekit.ops.blocked_moe_ffn` does. Accumulation is in float32 (float64 for float64 inputs). fp32
products use IEEE precision (no TF32), as torch's matmul does by default. The scatter-adds are atomic, so on a
GPU the order of the additions into one token's row (and its last bits) may vary between runs.

Status (session 14, 2026-12-07): tested on CPU only, under the Triton interpreter (``TRITON_INTERPRET=1``,
``tests/test_triton_engine.py``: outputs and gradients against the reference engine, float64 gradcheck); no
GPU was lent to this session, so it is untimed and unrun on a GPU, and the block sizes (:data:`BLOCKS`) are
untuned. On a GPU: ``bash benchmarks/gpu_check.sh`` (``pytest -m gpu tests/test_gpu.py``, then
``moekit bench --device cuda --engines sorted grouped_mm triton``). The Triton interpreter (3.9) computes
``tl.dot`` on bfloat16 wrongly on CPU; float16, float32 and float64 are right. The kernels use only Triton's
builtins, none of its ``@triton.jit`` library helpers (``tl.zeros`` is one; ``tl.full`` is used instead): helpers
built before ``TRITON_INTERPRET=1`` was set (torch.compile imports Triton) cannot run inside the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..experts.activations import hidden, hidden_backward

__all__ = ["triton_moe_ffn", "tile_schedule", "BLOCKS"]

# (rows per tile BM, output columns per tile BN, reduction depth per step BK); powers of two >= 16 (tl.dot's
# smallest operand). Untuned: no GPU was lent to the session that wrote this (see the module docstring).
BLOCKS: tuple[int, int, int] = (64, 64, 32)


@triton.jit
def _grouped_mm_kernel(
    A, A_IDX, W, W2, BIAS, BIAS2, SCALE, OUT, OUT2, ACT_OUT, OUT_IDX, TILES, M_TILES, Kdim, Nout,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_om,
    GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, SCATTER: tl.constexpr,
    TWO: tl.constexpr, SWIGLU: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One (row tile, column tile): ``acc = A[rows] @ W[e].T``; W2 (TWO) shares A's tile. OUT/OUT2 have unit
    column stride and row stride ``stride_om``; W2 has W's strides, BIAS2 BIAS's."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TILES + pid_m)
    r0 = tl.load(TILES + M_TILES + pid_m)
    r1 = tl.load(TILES + 2 * M_TILES + pid_m)
    if r0 < r1:
        rows = r0 + tl.arange(0, BM)
        rmask = rows < r1
        if GATHER_A:
            arows = tl.load(A_IDX + rows, mask=rmask, other=0)
        else:
            arows = rows
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < Nout
        acc = tl.full((BM, BN), 0, dtype=ACC)
        acc2 = tl.full((BM, BN), 0, dtype=ACC)
        w_base = W + e * stride_we
        for k0 in range(0, Kdim, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < Kdim
            a = tl.load(A + arows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            w_off = ks[:, None] * stride_wk + cols[None, :] * stride_wn
            wmask = kmask[:, None] & cmask[None, :]
            acc = tl.dot(a, tl.load(w_base + w_off, mask=wmask, other=0.0), acc, input_precision="ieee")
            if TWO:
                acc2 = tl.dot(a, tl.load(W2 + e * stride_we + w_off, mask=wmask, other=0.0), acc2,
                              input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(BIAS + e * stride_be + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            if TWO:
                acc2 += tl.load(BIAS2 + e * stride_be + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        omask = rmask[:, None] & cmask[None, :]
        if SWIGLU:  # acc: the gate product, acc2: the up product
            act = acc / (1.0 + tl.exp(-acc)) * acc2  # silu(gate) * up, in the accumulator's precision
            tl.store(ACT_OUT + rows[:, None] * stride_om + cols[None, :],
                     act.to(ACT_OUT.dtype.element_ty), mask=omask)
        if TWO:
            tl.store(OUT2 + rows[:, None] * stride_om + cols[None, :], acc2.to(OUT2.dtype.element_ty), mask=omask)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + rows, mask=rmask, other=0.0).to(ACC)[:, None]
        if SCATTER:
            orows = tl.load(OUT_IDX + rows, mask=rmask, other=0)
            tl.atomic_add(OUT + orows[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty), mask=omask)
        else:
            tl.store(OUT + rows[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty), mask=omask)


@triton.jit
def _weight_grad_kernel(
    G, G_IDX, X, X_IDX, SCALE, OFFS, OUT, Nn, Kk,
    stride_gm, stride_xm, stride_oe, stride_on,
    GATHER_G: tl.constexpr, GATHER_X: tl.constexpr, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``OUT[e, n, k] = sum_r scale[r] * G[gather(r), n] * X[gather(r), k]`` over expert e's rows. G, X and
    OUT have unit last-dim strides."""
    e = tl.program_id(0)
    ns = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.program_id(2) * BK + tl.arange(0, BK)
    nmask = ns < Nn
    kmask = ks < Kk
    r0 = tl.load(OFFS + e)
    r1 = tl.load(OFFS + e + 1)
    acc = tl.full((BN, BK), 0, dtype=ACC)
    for m0 in range(r0, r1, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < r1
        if GATHER_G:
            grows = tl.load(G_IDX + rows, mask=rmask, other=0)
        else:
            grows = rows
        if GATHER_X:
            xrows = tl.load(X_IDX + rows, mask=rmask, other=0)
        else:
            xrows = rows
        g = tl.load(G + grows[:, None] * stride_gm + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        if HAS_SCALE:
            g = (g.to(ACC) * tl.load(SCALE + rows, mask=rmask, other=0.0).to(ACC)[:, None]).to(G.dtype.element_ty)
        x = tl.load(X + xrows[:, None] * stride_xm + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
    tl.store(OUT + e * stride_oe + ns[:, None] * stride_on + ks[None, :], acc.to(OUT.dtype.element_ty),
             mask=nmask[:, None] & kmask[None, :])


def tile_schedule(counts_E: torch.Tensor, num_rows: int, block_rows: int) -> torch.Tensor:
    """The row tiles of expert-sorted rows, as ``[3, M]`` int32 ``(expert, first row, end row)``, built on the
    device without a host sync: expert e's ``counts_E[e]`` rows (segments consecutive from row 0) cut into tiles
    of at most ``block_rows``. ``M = ceil(num_rows / block_rows) + E`` (``num_rows >= counts_E.sum()``) bounds
    the number of tiles; unused slots are ``(0, 0, 0)``, empty tiles that the kernels skip."""
    E = counts_E.numel()
    M = -(-num_rows // block_rows) + E
    counts_E = counts_E.to(torch.int64)
    offs_E = torch.cumsum(counts_E, 0) - counts_E  # first row of each segment
    tiles_E = (counts_E + block_rows - 1) // block_rows
    last_tile_E = torch.cumsum(tiles_E, 0)  # one past each expert's last tile
    slot_M = torch.arange(M, device=counts_E.device)
    expert_M = torch.searchsorted(last_tile_E, slot_M, right=True)
    used_M = expert_M < E
    e_M = expert_M.clamp_max(E - 1)
    start_M = offs_E[e_M] + (slot_M - (last_tile_E[e_M] - tiles_E[e_M])) * block_rows
    end_M = torch.minimum(start_M + block_rows, offs_E[e_M] + counts_E[e_M])
    return torch.stack([e_M, start_M, end_M]).masked_fill_(~used_M, 0).to(torch.int32)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grouped_mm(a, w_EXY, out, tiles, blocks, *, a_idx=None, bias=None, scale=None, out_idx=None,
                w2=None, bias2=None, out2=None, act_out=None):
    """Launch :func:`_grouped_mm_kernel`: ``out[r] (+)= scale[r] * (a[a_idx[r]] @ w_EXY[e_r].T + bias[e_r])``
    with ``w_EXY: [E, X = out columns, Y = a columns]`` (any strides). ``out`` (and ``out2``, ``act_out``) are
    row-major with equal row strides."""
    BM, BN, BK = blocks
    Nout, Kdim = w_EXY.shape[1], w_EXY.shape[2]
    M = tiles.shape[1]
    dummy = tiles  # for pointers a launch does not read (their constexpr flags are off)
    grid = (M, triton.cdiv(Nout, BN))
    _grouped_mm_kernel[grid](
        a, dummy if a_idx is None else a_idx, w_EXY, dummy if w2 is None else w2,
        dummy if bias is None else bias, dummy if bias2 is None else bias2, dummy if scale is None else scale,
        out, dummy if out2 is None else out2, dummy if act_out is None else act_out,
        dummy if out_idx is None else out_idx, tiles, M, Kdim, Nout,
        a.stride(0), a.stride(1), w_EXY.stride(0), w_EXY.stride(1), w_EXY.stride(2),
        0 if bias is None else bias.stride(0), out.stride(0),
        GATHER_A=a_idx is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        SCATTER=out_idx is not None, TWO=w2 is not None, SWIGLU=act_out is not None,
        ACC=_acc_dtype(a.dtype), BM=BM, BN=BN, BK=BK,
    )
    return out


def _weight_grad(g, x, offs_E1, out_EXY, blocks, *, g_idx=None, x_idx=None, scale=None):
    """Launch :func:`_weight_grad_kernel`: ``out_EXY[e] = sum_r (scale[r] g[g_idx[r]]).T @ x[x_idx[r]]``."""
    BM, BN, BK = blocks
    E, Nn, Kk = out_EXY.shape
    grid = (E, triton.cdiv(Nn, BN), triton.cdiv(Kk, BK))
    _weight_grad_kernel[grid](
        g, offs_E1 if g_idx is None else g_idx, x, offs_E1 if x_idx is None else x_idx,
        offs_E1 if scale is None else scale, offs_E1, out_EXY, Nn, Kk,
        g.stride(0), x.stride(0), out_EXY.stride(0), out_EXY.stride(1),
        GATHER_G=g_idx is not None, GATHER_X=x_idx is not None, HAS_SCALE=scale is not None,
        ACC=_acc_dtype(g.dtype), BM=BM, BN=BN, BK=BK,
    )
    return out_EXY


def _like(w: torch.Tensor) -> torch.Tensor:
    """A row-major buffer of ``w``'s shape (weights may be strided views; the kernels write row-major)."""
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _acc_buffer(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                       device=like.device)


class _TritonMoEFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_N, token_N, expert_N, offs_E1, tiles, w_gate_EFD, w_up_EFD, w_down_EDF,
                b_gate_EF, b_up_EF, b_down_ED, activation, blocks):
        N, F_ = token_N.numel(), w_up_EFD.shape[1]
        gated = w_gate_EFD is not None
        h_up_NF = x_TD.new_zeros(N, F_)  # zeros: rows of empty slots stay 0 (no tile writes them)
        h_gate_NF = x_TD.new_zeros(N, F_) if gated else None
        if gated:
            a_NF = x_TD.new_zeros(N, F_) if activation == "swiglu" else None
            _grouped_mm(x_TD, w_gate_EFD, h_gate_NF, tiles, blocks, a_idx=token_N, bias=b_gate_EF,
                        w2=w_up_EFD, bias2=b_up_EF, out2=h_up_NF, act_out=a_NF)
            if a_NF is None:
                a_NF = hidden(activation, h_gate_NF, h_up_NF)
        else:
            _grouped_mm(x_TD, w_up_EFD, h_up_NF, tiles, blocks, a_idx=token_N, bias=b_up_EF)
            a_NF = hidden(activation, None, h_up_NF)
        y_TD = _acc_buffer(x_TD)
        _grouped_mm(a_NF, w_down_EDF, y_TD, tiles, blocks, bias=b_down_ED, scale=weights_N, out_idx=token_N)
        ctx.save_for_backward(x_TD, weights_N, token_N, expert_N, offs_E1, tiles, w_gate_EFD, w_up_EFD,
                              w_down_EDF, b_down_ED, h_gate_NF, h_up_NF)
        ctx.activation, ctx.blocks = activation, blocks
        ctx.has_bias = (b_gate_EF is not None, b_up_EF is not None, b_down_ED is not None)
        return y_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, grad_y_TD):
        (x_TD, weights_N, token_N, expert_N, offs_E1, tiles, w_gate, w_up, w_down, b_down, h_gate_NF,
         h_up_NF) = ctx.saved_tensors
        activation, blocks = ctx.activation, ctx.blocks
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_gate, need_up, need_down = ctx.needs_input_grad[6:9]
        need_bg, need_bu, need_bd = (has and need for has, need in zip(ctx.has_bias, ctx.needs_input_grad[9:12]))
        g_TD = grad_y_TD.contiguous().to(x_TD.dtype)
        E, F_, _ = w_up.shape
        N = token_N.numel()
        valid_N = expert_N < E  # empty slots: expert index E, sorted last
        e_N = expert_N.clamp_max(E - 1)
        a_NF = hidden(activation, h_gate_NF, h_up_NF)  # recomputed from the saved products
        grad_a_NF = x_TD.new_zeros(N, F_)  # unscaled: the combine weights' gradient comes from it
        _grouped_mm(g_TD, w_down.transpose(1, 2), grad_a_NF, tiles, blocks, a_idx=token_N)
        g_ND = g_TD[token_N] if b_down is not None and (need_w or need_bd) else None  # for the down bias
        grad_weights = None
        if need_w:
            gw_N = (grad_a_NF.to(torch.float32 if x_TD.dtype != torch.float64 else x_TD.dtype)
                    * a_NF).sum(-1)
            if g_ND is not None:
                gw_N = gw_N + (g_ND * b_down[e_N]).sum(-1)
            grad_weights = torch.where(valid_N, gw_N, gw_N.new_zeros(())).to(weights_N.dtype)
        grad_a_NF = grad_a_NF * weights_N.to(grad_a_NF.dtype)[:, None]
        grad_gate_NF, grad_up_NF = hidden_backward(activation, h_gate_NF, h_up_NF, grad_a_NF)
        grad_gate = grad_up = grad_down = grad_bg = grad_bu = grad_bd = grad_x = None
        if need_down:
            grad_down = _weight_grad(g_TD, a_NF.contiguous(), offs_E1, _like(w_down), blocks,
                                     g_idx=token_N, scale=weights_N)
        if need_up:
            grad_up = _weight_grad(grad_up_NF.contiguous(), x_TD, offs_E1, _like(w_up), blocks,
                                   x_idx=token_N)
        if need_gate and grad_gate_NF is not None:
            grad_gate = _weight_grad(grad_gate_NF.contiguous(), x_TD, offs_E1, _like(w_gate), blocks,
                                     x_idx=token_N)
        def per_expert_sum(rows_NX: torch.Tensor) -> torch.Tensor:  # a bias gradient: rows summed by expert
            rows_NX = torch.where(valid_N[:, None], rows_NX, rows_NX.new_zeros(()))
            return rows_NX.new_zeros(E, rows_NX.shape[1]).index_add_(0, e_N, rows_NX)

        if need_bu:
            grad_bu = per_expert_sum(grad_up_NF)
        if need_bg and grad_gate_NF is not None:
            grad_bg = per_expert_sum(grad_gate_NF)
        if need_bd and g_ND is not None:
            grad_bd = per_expert_sum(g_ND * weights_N.to(g_TD.dtype)[:, None])
        if need_x:
            gx_TD = _acc_buffer(x_TD)
            _grouped_mm(grad_up_NF.contiguous(), w_up.transpose(1, 2), gx_TD, tiles, blocks, out_idx=token_N)
            if grad_gate_NF is not None:
                _grouped_mm(grad_gate_NF.contiguous(), w_gate.transpose(1, 2), gx_TD, tiles, blocks,
                            out_idx=token_N)
            grad_x = gx_TD.to(x_TD.dtype)
        return (grad_x, grad_weights, None, None, None, None, grad_gate, grad_up, grad_down, grad_bg, grad_bu,
                grad_bd, None, None)


def _check_blocks(blocks: tuple[int, int, int]) -> tuple[int, int, int]:
    if (len(blocks) != 3 or any(not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1)
                                for b in blocks)):
        raise ValueError(f"triton_moe_ffn: blocks must be three powers of two >= 16 (rows, columns, depth per "
                         f"tile; tl.dot's smallest operand is 16), got {blocks!r}")
    return tuple(blocks)  # type: ignore[return-value]


def triton_moe_ffn(
    x_TD: torch.Tensor,
    weights_N: torch.Tensor,
    token_N: torch.Tensor,
    expert_N: torch.Tensor,
    counts_E: torch.Tensor,
    w_gate_EFD: torch.Tensor | None,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    activation: str,
    b_gate_EF: torch.Tensor | None = None,
    b_up_EF: torch.Tensor | None = None,
    b_down_ED: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``y_TD`` for the ``N`` assignment slots sorted by expert (empty slots last): slot ``n`` sends token
    ``token_N[n]`` to expert ``expert_N[n]`` (``E`` for an empty slot) with weight ``weights_N[n]``;
    ``counts_E[e]`` slots per expert, a device tensor (no host sync). ``blocks``: the tile sizes
    (default :data:`BLOCKS`)."""
    blocks = _check_blocks(BLOCKS if blocks is None else blocks)
    E = w_up_EFD.shape[0]
    if counts_E.numel() != E or not (token_N.numel() == expert_N.numel() == weights_N.numel()):
        raise ValueError(f"triton_moe_ffn: counts_E has {counts_E.numel()} entries for {E} experts, and token_N, "
                         f"expert_N, weights_N have {token_N.numel()}, {expert_N.numel()}, {weights_N.numel()}: "
                         f"one count per expert and one entry per slot are needed")
    tiles = tile_schedule(counts_E, token_N.numel(), blocks[0])
    offs_E1 = torch.cat([counts_E.new_zeros(1), torch.cumsum(counts_E, 0)]).to(torch.int32)
    return _TritonMoEFFN.apply(x_TD.contiguous(), weights_N.contiguous(), token_N.contiguous(),
                               expert_N.contiguous(), offs_E1, tiles, w_gate_EFD, w_up_EFD, w_down_EDF,
                               b_gate_EF, b_up_EF, b_down_ED, activation, blocks)
