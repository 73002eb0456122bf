"""Expert-reducing methods: M-SMoE (spec §1), Expert Merging / ++ (spec §3) and DERN (spec §2), each a
transform of one MoE layer given its calibration record. Dim legend: E experts, G stored experts, D model dim.
"""

from __future__ import annotations

import torch

from ..layers import MoE
from .baselines import _merged_bank
from .calibrate import CompressionError, LayerRecord
from .merge import align_neurons, global_group_counts, msmoe_groups, permute_expert
from .options import CompressOptions, _float_bank, _keep, _stacked
from .surgery import install_bank, prune_router

# ---- M-SMoE --------------------------------------------------------------------------------------------------

def _plan_msmoe(records: dict[str, LayerRecord], opts: CompressOptions, layers: dict[str, MoE], model) -> dict[str, int]:
    names = list(records)
    keep = _keep(layers[names[0]], opts)
    counts = global_group_counts([records[n].frequency_E() for n in names], keep)
    return dict(zip(names, counts))


def _apply_msmoe(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    num_groups = plan[record.name] if plan else _keep(moe, opts)
    groups = msmoe_groups(record, num_groups)
    install_bank(moe, _merged_bank(moe, groups, record.frequency_E(), align=True))


# ---- Expert Merging / ++ ---------------------------------------------------------------------------------------

def _apply_expert_merging(moe: MoE, record: LayerRecord, opts: CompressOptions, plan, plus: bool = False) -> None:
    from .expert_merging import allocate_chunks, fit_merge, unit_importance
    num_groups = plan[record.name] if plan else _keep(moe, opts)
    groups = msmoe_groups(record, num_groups)
    experts = _stacked(moe)
    freq = record.frequency_E()
    slots = torch.empty(len(experts), dtype=torch.long)
    problems = []
    for g, members in enumerate(groups):
        slots[members] = g
        ref = experts[members[0]]
        aligned = [ref] + [permute_expert(experts[i], align_neurons(ref, experts[i])) for i in members[1:]]
        f = [float(freq[i]) for i in members]
        alphas = [x / sum(f) for x in f] if sum(f) > 0 else [1 / len(f)] * len(f)
        inputs = [record.tokens_of(i, opts.max_tokens_per_expert) for i in members]
        problems.append((ref, aligned, inputs, alphas))
    merged: list[dict[str, torch.Tensor]] = []
    first: list = []
    for ref, aligned, inputs, alphas in problems:
        if len(aligned) == 1:
            merged.append(ref)
            first.append(None)
            continue
        w, coefs = fit_merge(ref, aligned, inputs, alphas, moe.config.activation, steps=opts.merge_steps)
        merged.append(w)
        first.append(coefs)
    if plus:  # Expert Merging++: re-allocate chunks across the layer's merged tensors by importance, retrain
        coefs_all, taus_all = {}, {}
        for g, ((ref, aligned, _, _), coefs) in enumerate(zip(problems, first)):
            if coefs is None:
                continue
            for n in ref:
                coefs_all[(g, n)] = coefs.coef(n).detach()
                taus_all[(g, n)] = [m[n] - ref[n] for m in aligned]
        if coefs_all:
            chunks = allocate_chunks(unit_importance(coefs_all, taus_all), opts.budget * len(coefs_all), opts.kappa)
            for g, ((ref, aligned, inputs, alphas), coefs) in enumerate(zip(problems, first)):
                if coefs is None:
                    continue
                mine = {n: chunks[(g, n)] for n in ref}
                fixed = {n: coefs_all[(g, n)] for n in ref}
                merged[g], _ = fit_merge(ref, aligned, inputs, alphas, moe.config.activation, chunks=mine,
                                         fixed=fixed, steps=opts.merge_steps)
    install_bank(moe, _float_bank(merged, slots, moe.config.activation))


def _apply_expert_merging_pp(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    _apply_expert_merging(moe, record, opts, plan, plus=True)


# ---- DERN ---------------------------------------------------------------------------------------------------

def _apply_dern(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    from .dern import from_segments, recombine, segments, transfer_segments
    keep = _keep(moe, opts)
    experts = _stacked(moe)
    if "b_up" in experts[0]:
        raise CompressionError(f"{moe.name}: DERN does not handle experts with biases; use m-smoe or prune-frequency")
    importance = record.importance_E()
    order = sorted(range(len(experts)), key=lambda i: (-float(importance[i]), i))
    kept, dropped = sorted(order[:keep]), sorted(order[keep:])
    gated, D = "w_gate" in experts[0], moe.config.dim
    segs = [segments(w) for w in experts]
    received, _ = transfer_segments([segs[i] for i in kept], [segs[i] for i in dropped], D, gated, opts.alpha)
    new = []
    for k, i in enumerate(kept):
        pairs = received[k]
        got = torch.stack([segs[dropped[d]][j] for d, j in pairs]) if pairs else segs[i][:0]
        weights = torch.tensor([float(importance[dropped[d]]) for d, _ in pairs])
        new.append(from_segments(recombine(segs[i], got, float(importance[i]), weights, D, gated), D, gated))
    prune_router(moe, kept)
    install_bank(moe, _float_bank(new, torch.arange(keep), moe.config.activation))
