"""The ``sorted`` engine: dropless sort-by-expert execution.

Dim legend: T tokens, D model dim, K slots per token, N valid assignments, E experts.

One stable sort of the ``T*K`` assignments by expert, the tokens gathered into contiguous per-expert
segments, per-expert matmuls and one weighted scatter-add back to token order: either
:func:`moekit.ops.sorted_moe_ffn` (one autograd function with an in-place weight-gradient backward) or
``torch.nn.functional.grouped_mm`` on CUDA, where it needs no host sync. Empty slots (``-1``) sort first and are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..experts import ExpertBank, hidden
from ..ops import sorted_moe_ffn
from ..types import Routing
from .registry import register_engine

__all__ = ["sorted_engine", "grouped_mm_engine"]


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


def _grouped_mm_supported(x: torch.Tensor, bank: ExpertBank) -> str | None:
    if not hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm needs torch >= 2.8"
    if x.device.type != "cuda":
        return "grouped_mm is a loop of matmuls on CPU (no faster); it is chosen automatically only on CUDA"
    if x.dtype != torch.bfloat16:
        return f"grouped_mm on CUDA wants bfloat16 inputs, got {x.dtype}"
    return None


@register_engine("grouped_mm", priority=20, supports=_grouped_mm_supported)
def grouped_mm_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Sort-by-expert with ``F.grouped_mm``: no host sync, autograd through grouped_mm itself.

    Empty slots are sorted to the end, past the last offset, and their rows zeroed before combining.
    """
    T, K = routing.expert_ids_TK.shape
    E = bank.num_experts
    ids_N = routing.expert_ids_TK.reshape(-1)
    ids_N = torch.where(ids_N < 0, torch.full_like(ids_N, E), ids_N)  # empty slots sort last
    order_N = torch.argsort(ids_N, stable=True)
    offs_E = torch.cumsum(torch.bincount(ids_N, minlength=E + 1)[:E], 0).to(torch.int32)
    token_N = order_N // K
    valid_N1 = (ids_N[order_N] < E)[:, None]
    zero = x_TD.new_zeros(())
    # grouped_mm leaves rows past the last offset unwritten, in forward and in backward: every tensor that
    # crosses it is masked so that neither garbage values nor garbage gradients reach x or the biases.
    x_ND = torch.where(valid_N1, x_TD[token_N], zero)
    sorted_ids_N = ids_N[order_N].clamp_max(E - 1)  # empty slots borrow the last expert's bias; masked

    def bias(b):
        return 0.0 if b is None else b[sorted_ids_N]

    h_up = F.grouped_mm(x_ND, bank.w_up.transpose(-2, -1), offs=offs_E) + bias(bank.b_up)
    h_gate = (F.grouped_mm(x_ND, bank.w_gate.transpose(-2, -1), offs=offs_E) + bias(bank.b_gate)
              if bank.gated else None)
    a_NF = torch.where(valid_N1, hidden(bank.activation, h_gate, h_up), zero)
    out_ND = F.grouped_mm(a_NF, bank.w_down.transpose(-2, -1), offs=offs_E) + bias(bank.b_down)
    weights_N = routing.weights_TK.reshape(-1)[order_N].to(out_ND.dtype)
    out_ND = torch.where(valid_N1, out_ND * weights_N[:, None], zero)
    return torch.zeros_like(x_TD).index_add(0, token_N, out_ND)
