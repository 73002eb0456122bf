"""Weight layouts shared by several transformers MoE families (HF names live only in ``moekit/hf/``).

Dim legend: E experts, F expert hidden dim, D model dim.

- *Packed experts* (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3 in transformers 5): ``experts.gate_up_proj
  [E, 2F, D]`` holding ``[gate; up]`` and ``experts.down_proj [E, D, F]``, i.e. moekit's layout with gate and up
  packed together. Splitting is a view; packing back is one copy.
- *Dense MLP* (shared experts): ``gate_proj / up_proj / down_proj`` ``nn.Linear`` weights ``[F, D]``, ``[F, D]``,
  ``[D, F]``: exactly moekit's :class:`~moekit.FeedForward`, shared as is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..experts import Activation
from .adapter import ConversionError, join_halves, split_halves

__all__ = ["packed_experts_to_moekit", "packed_experts_to_hf", "mlp_to_moekit", "mlp_to_hf", "gated_activation"]

Tensors = Mapping[str, torch.Tensor]


def packed_experts_to_moekit(hf: Tensors, prefix: str = "experts.") -> dict[str, torch.Tensor]:
    w_gate_EFD, w_up_EFD = split_halves(hf[prefix + "gate_up_proj"], dim=1)
    return {"experts.w_gate": w_gate_EFD, "experts.w_up": w_up_EFD, "experts.w_down": hf[prefix + "down_proj"]}


def packed_experts_to_hf(mk: Tensors, prefix: str = "experts.") -> dict[str, torch.Tensor]:
    return {prefix + "gate_up_proj": join_halves(mk["experts.w_gate"], mk["experts.w_up"], dim=1),
            prefix + "down_proj": mk["experts.w_down"]}


def mlp_to_moekit(hf: Tensors, hf_prefix: str, mk_prefix: str = "shared_experts.") -> dict[str, torch.Tensor]:
    return {mk_prefix + "w_gate": hf[hf_prefix + "gate_proj.weight"],
            mk_prefix + "w_up": hf[hf_prefix + "up_proj.weight"],
            mk_prefix + "w_down": hf[hf_prefix + "down_proj.weight"]}


def mlp_to_hf(mk: Tensors, hf_prefix: str, mk_prefix: str = "shared_experts.") -> dict[str, torch.Tensor]:
    return {hf_prefix + "gate_proj.weight": mk[mk_prefix + "w_gate"],
            hf_prefix + "up_proj.weight": mk[mk_prefix + "w_up"],
            hf_prefix + "down_proj.weight": mk[mk_prefix + "w_down"]}


def gated_activation(hidden_act: str, where: str) -> Activation:
    """moekit's name for a gated expert ``act(gate) * up`` with HF activation ``hidden_act``."""
    if hidden_act in ("silu", "swish"):
        return "swiglu"
    raise ConversionError(f"{where}: hidden_act={hidden_act!r} in a gated expert has no moekit activation "
                          f"(supported: 'silu'); add it to moekit.experts.activations first")
