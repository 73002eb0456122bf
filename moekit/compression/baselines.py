"""The baselines every table shows: round-to-nearest per channel, routing-frequency expert pruning, random
expert merging. Dim legend: E experts, G stored experts.
"""

from __future__ import annotations

import torch

from ..layers import MoE
from .bank import CompressedBank
from .calibrate import LayerRecord
from .merge import align_neurons, merge_weights, permute_expert, random_groups
from .options import CompressOptions, _biases, _bits, _float_bank, _keep, _rotated, _stacked, _with_activation
from .quant import rtn
from .surgery import install_bank, prune_router


def _apply_rtn(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    bits = int(_bits(opts, (2, 3, 4, 8), 8))
    experts = [_rotated(e, opts) for e in _stacked(moe)]
    codes: dict[str, list] = {m: [rtn(e[m], bits) for e in experts] for m in ("w_gate", "w_up", "w_down") if m in experts[0]}
    slots = torch.arange(len(experts))
    install_bank(moe, _with_activation(CompressedBank.from_quantized(codes, slots, activation=moe.config.activation,
                                                                     biases=_biases(experts)), opts))


def _apply_prune(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    keep = _keep(moe, opts)
    counts = record.counts_E()
    order = sorted(range(len(counts)), key=lambda i: (-float(counts[i]), i))
    kept = sorted(order[:keep])
    experts = _stacked(moe)
    prune_router(moe, kept)
    install_bank(moe, _float_bank([experts[i] for i in kept], torch.arange(keep), moe.config.activation))


def _merged_bank(moe: MoE, groups: list[list[int]], freq_E: torch.Tensor, align: bool) -> CompressedBank:
    experts = _stacked(moe)
    slots = torch.empty(len(experts), dtype=torch.long)
    merged = []
    for g, members in enumerate(groups):
        ref = experts[members[0]]
        aligned = [ref] + [permute_expert(experts[i], align_neurons(ref, experts[i])) if align else experts[i]
                           for i in members[1:]]
        merged.append(merge_weights(aligned, [float(freq_E[i]) for i in members]))
        slots[members] = g
    return _float_bank(merged, slots, moe.config.activation)


def _apply_random_merge(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    keep = _keep(moe, opts)
    gen = torch.Generator().manual_seed(opts.seed + sum(map(ord, moe.name)))
    groups = random_groups(moe.config.num_experts, keep, gen)
    install_bank(moe, _merged_bank(moe, groups, torch.ones(moe.config.num_experts), align=False))
