"""The ``sorted`` engine: dropless sort-by-expert execution.

Dim legend: T tokens, D model dim, K slots per token, N valid assignments, E experts.

One stable sort of the ``T*K`` assignments by expert, the tokens gathered into contiguous per-expert
segments, per-expert matmuls and one weighted scatter-add back to token order: either
:func:`moekit.ops.sorted_moe_ffn` (one autograd function with an in-place weight-gradient backward) or
``torch.nn.functional.grouped_mm`` on CUDA, where it needs no host sync. Empty slots (``-1``) sort first and are
skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..experts import ExpertBank, hidden
from ..ops import blocked_moe_ffn, sorted_moe_ffn
from ..types import Routing
from .registry import register_engine

__all__ = ["sorted_engine", "sorted_blocked_engine", "grouped_mm_engine", "sort_empty_last", "BLOCK_ROWS"]


def sort_empty_last(routing: Routing, num_experts: int):
    """The ``T*K`` slots stably sorted by expert with the empty slots (``-1``) last, without a host sync:
    ``(order_N, sorted_ids_N, counts_E)``, where an empty slot's sorted id is ``num_experts`` and ``counts_E``
    (a device tensor) counts each expert's slots. Used by the engines that run without host syncs
    (``grouped_mm``, ``triton``)."""
    E = num_experts
    ids_N = routing.expert_ids_TK.reshape(-1)
    ids_N = torch.where(ids_N < 0, torch.full_like(ids_N, E), ids_N)
    order_N = torch.argsort(ids_N, stable=True)
    return order_N, ids_N[order_N], torch.bincount(ids_N, minlength=E + 1)[:E]


def _sort(routing: Routing, num_experts: int):
    ids_N = routing.expert_ids_TK.reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    counts = torch.bincount(ids_N + 1, minlength=num_experts + 1)
    return ids_N, order_N, counts


@register_engine("sorted", priority=10)
def sorted_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Dropless sort-by-expert engine (one host sync per call for the segment sizes)."""
    T, K = routing.expert_ids_TK.shape
    _, order_N, counts = _sort(routing, bank.num_experts)
    counts = counts.tolist()
    valid_N = order_N[counts[0]:]  # drop the empty slots, which sort first
    weights_N = routing.weights_TK.reshape(-1)[valid_N]
    return sorted_moe_ffn(x_TD, weights_N, valid_N // K, counts[1:], bank.w_gate, bank.w_up, bank.w_down,
                          bank.activation, bank.b_gate, bank.b_up, bank.b_down)


# Most rows per block of the ``sorted_blocked`` engine; None: one block per expert segment, which measured
# fastest (docs/benchmarks.md, 2026-12-07: blocks of 512 rows were 2-5% slower on every shape measured).
BLOCK_ROWS: int | None = None


def _blocked_priority(x: torch.Tensor, bank: ExpertBank) -> int:
    """Above ``sorted`` (10) on CPU for experts no wider than the model (fine-grained experts: the ``default``
    preset's 32 x 128 at dim 256), where it measured faster; below it on wider experts (Mixtral-like, the
    ``coarse`` preset), where it was level or slower, and off CPU (docs/benchmarks.md)."""
    return 15 if x.device.type == "cpu" and bank.hidden_dim <= bank.dim else 5


@register_engine("sorted_blocked", priority=_blocked_priority)
def sorted_blocked_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """The ``sorted`` engine's computation one expert's segment at a time (blocks of at most :data:`BLOCK_ROWS`
    rows when set; :func:`moekit.ops.blocked_moe_ffn`): gather, products, activation and weighted scatter of a
    segment while it is in cache, and the hidden activation recomputed in backward instead of saved. ``auto``
    picks it on CPU for experts no wider than the model (:func:`_blocked_priority`)."""
    T, K = routing.expert_ids_TK.shape
    _, order_N, counts = _sort(routing, bank.num_experts)
    counts = counts.tolist()
    valid_N = order_N[counts[0]:]
    weights_N = routing.weights_TK.reshape(-1)[valid_N]
    return blocked_moe_ffn(x_TD, weights_N, valid_N // K, counts[1:], bank.w_gate, bank.w_up, bank.w_down,
                           bank.activation, bank.b_gate, bank.b_up, bank.b_down, block_rows=BLOCK_ROWS)


def _grouped_mm_supported(x: torch.Tensor, bank: ExpertBank) -> str | None:
    if not hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm needs torch >= 2.8"
    if x.device.type != "cuda":
        return "grouped_mm is a loop of matmuls on CPU (no faster); it is chosen automatically only on CUDA"
    if x.dtype != torch.bfloat16:
        return f"grouped_mm on CUDA wants bfloat16 inputs, got {x.dtype}"
    return _grouped_mm_layout_problem(bank)


def _grouped_mm_layout_problem(bank: ExpertBank) -> str | None:
    """grouped_mm needs each weight 16-byte aligned, with a unit stride in one of its last two dims and the
    other strides multiples of 16 bytes. Strided views of checkpoint tensors (GPT-OSS's interleaved gate/up
    halves) are not; ``moekit.hf.patch(..., copy=True)`` gives contiguous copies that are."""
    for name in ("w_gate", "w_up", "w_down"):
        w = getattr(bank, name)
        if w is None:
            continue
        size = w.element_size()
        if (w.data_ptr() % 16 or 1 not in w.stride()[-2:]
                or any((s * size) % 16 for s in w.stride() if s != 1)):
            return f"experts.{name} (strides {tuple(w.stride())}) is not laid out for grouped_mm"
    return None


@register_engine("grouped_mm", priority=20, supports=_grouped_mm_supported)
def grouped_mm_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Sort-by-expert with ``F.grouped_mm``: no host sync, autograd through grouped_mm itself.

    Empty slots are sorted to the end, past the last offset. ``grouped_mm`` leaves those rows of its output
    *and of its input gradient* unwritten (garbage, possibly NaN), so every tensor that leaves a grouped_mm
    or enters one is masked with ``where``: ``where`` passes exactly 0, not ``0 * garbage``, to the other
    branch, in forward and in backward.
    """
    T, K = routing.expert_ids_TK.shape
    E = bank.num_experts
    order_N, sorted_ids_N, counts_E = sort_empty_last(routing, E)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    token_N = order_N // K
    valid_N1 = (sorted_ids_N < E)[:, None]
    sorted_ids_N = sorted_ids_N.clamp_max(E - 1)  # empty slots borrow the last expert's bias; masked

    def masked(t):
        return torch.where(valid_N1, t, t.new_zeros(()))

    def project(a, w_EXY, b_EX):
        h = F.grouped_mm(a, w_EXY.transpose(-2, -1), offs=offs_E)
        return masked(h if b_EX is None else h + b_EX[sorted_ids_N])

    x_ND = masked(x_TD[token_N])
    h_up = project(x_ND, bank.w_up, bank.b_up)
    h_gate = project(x_ND, bank.w_gate, bank.b_gate) if bank.gated else None
    out_ND = project(hidden(bank.activation, h_gate, h_up), bank.w_down, bank.b_down)
    weights_N = routing.weights_TK.reshape(-1)[order_N].to(out_ND.dtype)
    out_ND = masked(out_ND * weights_N[:, None])
    return torch.zeros_like(x_TD).index_add(0, token_N, out_ND)
