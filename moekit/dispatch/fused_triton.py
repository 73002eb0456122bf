"""The ``triton`` engine: sort-by-expert with Triton kernels that fuse the gather, gate+up, the activation, the
combine weights and the scatter into grouped products (:mod:`moekit.ops.triton_moe`).

Dim legend: T tokens, K slots per token, N = T*K slots, E experts.

No host sync: the slots are sorted on the device (empty slots last), and the kernels' work list is built from
the per-expert counts on the device. ``auto`` never picks it (priority 1, below every other engine): it is
untimed on a GPU (no GPU was lent to the session that wrote it; docs/benchmarks.md). Name it explicitly:
``engine="triton"`` or ``--model.moe.engine=triton``. On CPU it runs under the Triton interpreter when
``TRITON_INTERPRET=1`` is set before Triton is first imported (slow: for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..experts import ExpertBank
from ..types import Routing
from .registry import register_engine
from .sorted import sort_empty_last

__all__ = ["triton_engine"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_supported(x: torch.Tensor, bank: ExpertBank) -> str | None:
    if not _triton_installed():
        return "Triton is not installed (pip install 'moekit[triton]', Linux only)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreted):
        return (f"the Triton kernels run on CUDA devices, or on the CPU under the Triton interpreter "
                f"(set TRITON_INTERPRET=1 before importing Triton; slow, for tests); the input is on {x.device}")
    allowed = _DTYPES + ((torch.float64,) if x.device.type == "cpu" else ())
    if x.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        return f"the Triton kernels take {names} inputs, got {x.dtype}"
    for name in ("w_gate", "w_up", "w_down"):
        w = getattr(bank, name)
        if w is not None and w.dtype != x.dtype:
            return f"experts.{name} is {w.dtype} but the input is {x.dtype}; the kernels need them equal"
    return None


@register_engine("triton", priority=1, supports=_triton_supported)
def triton_engine(x_TD: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    """Dropless sort-by-expert with fused Triton kernels (:func:`moekit.ops.triton_moe.triton_moe_ffn`)."""
    from ..ops.triton_moe import triton_moe_ffn  # imported on first use: Triton reads TRITON_INTERPRET then

    K = routing.expert_ids_TK.shape[1]
    E = bank.num_experts
    order_N, expert_N, counts_E = sort_empty_last(routing, E)
    weights_N = routing.weights_TK.reshape(-1)[order_N]
    weights_N = torch.where(expert_N < E, weights_N, weights_N.new_zeros(()))
    return triton_moe_ffn(x_TD, weights_N, order_N // K, expert_N, counts_E, bank.w_gate, bank.w_up,
                          bank.w_down, bank.activation, bank.b_gate, bank.b_up, bank.b_down)
