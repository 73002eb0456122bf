"""The compression methods and baselines, by name, each a transform of one MoE layer given its calibration record.

Dim legend: E experts, G stored experts, F expert hidden dim, D model dim, T tokens, R rows, C columns.

Every method ends with :func:`~.surgery.install_bank` (and, when it drops experts, :func:`~.surgery.prune_router`),
so the layer keeps its calling convention, router semantics and statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..experts.activations import hidden
from ..layers import MoE
from .bank import CompressedBank, expert_weights
from .calibrate import CompressionError, LayerRecord
from .gptq import gptq, hessian
from .merge import (
    align_neurons,
    global_group_counts,
    groups_for_target,
    merge_weights,
    msmoe_groups,
    permute_expert,
    random_groups,
)
from .quant import RowGrid, minmax_grid, rtn, ternary_grid
from .surgery import install_bank, prune_router

__all__ = ["METHODS", "CompressOptions", "Method", "get_method"]


@dataclass(frozen=True, kw_only=True)
class CompressOptions:
    """Settings of one compression.

    Attributes:
        bits: bits per weight for quantisers (RTN/GPTQ: 2-8; QMoE: 1.5 = ternary, or 2).
        keep_experts: experts (or merged groups) kept per layer, for merging and pruning.
        target_memory: fraction of the float expert bytes to aim for; sets ``bits`` or ``keep_experts``
            when those are not given.
        codec: QMoE only: entropy-code the ternary weights (Tunstall-style, lossless).
        fit_codebook: QMoE's codec: grow each matrix's dictionary from its measured symbol frequencies
            (``tunstall-fit``) instead of the paper's fixed P(0) = 0.885 one (``tunstall``).
        percdamp: GPTQ damping (QMoE: 0.1).
        max_tokens_per_expert: cap on each expert's calibration tokens (None: all routed tokens).
        seed: for the random baseline.
        alpha: DERN's segment similarity threshold (spec: start at 0.5-0.6).
        levels / group_size: D²MoE MWQ's residual planes above the ``bits``-bit base (V1: 2-bit base + 2 = INT2/3/4),
            and its group size (128).
        merge_steps / budget / kappa: Expert Merging's optimisation steps, and ++'s chunk budget (a multiple of
            the number of merged tensors) and steepness κ.
    """

    bits: float | None = None
    keep_experts: int | None = None
    target_memory: float | None = None
    codec: bool = True
    fit_codebook: bool = True
    percdamp: float = 0.1
    max_tokens_per_expert: int | None = None
    seed: int = 0
    alpha: float = 0.5
    levels: int = 2
    group_size: int = 128
    merge_steps: int = 40
    budget: float = 1.0
    kappa: float = 1.0

    def __post_init__(self) -> None:
        if self.target_memory is not None and not 0 < self.target_memory <= 1:
            raise CompressionError(f"target_memory={self.target_memory} must be in (0, 1], a fraction of the float "
                                   f"expert bytes (e.g. 0.5)")
        if self.keep_experts is not None and self.keep_experts < 1:
            raise CompressionError(f"keep_experts={self.keep_experts} must be at least 1; keeping 0 experts "
                                   f"leaves nothing to route to")
        if self.percdamp < 0:
            raise CompressionError(f"percdamp={self.percdamp} must be >= 0 (QMoE uses 0.1)")


@dataclass(frozen=True)
class Method:
    """A named compression.

    Attributes:
        name: what ``--method`` takes.
        kind: ``quantise`` (sets bits) or ``reduce`` (merges or drops experts).
        sequential: recalibrate before each layer, so later layers see compressed activations (QMoE's order).
        baseline: shown beside the methods in every table.
        apply: ``apply(moe, record, options, plan)`` changes the layer in place.
        plan: optional ``plan(records, options, layers, model) -> {layer name: value}`` across all layers
            (M-SMoE's groups, EAQuant's input norms).
        summary: one line for ``--list``.
    """

    name: str
    kind: str
    sequential: bool
    baseline: bool
    apply: Callable
    summary: str
    plan: Callable | None = None
    default_bits: float | None = None


def _stacked(moe: MoE) -> list[dict[str, torch.Tensor]]:
    if isinstance(moe.experts, CompressedBank):
        raise CompressionError(f"{moe.name} is already compressed; compress the original run instead")
    return [{k: v.detach().float().cpu() for k, v in expert_weights(moe.experts, e).items()}
            for e in range(moe.config.num_experts)]


def _float_bank(experts: list[dict[str, torch.Tensor]], slots_E: torch.Tensor, activation: str) -> CompressedBank:
    weights = {m: torch.stack([e[m] for e in experts]) for m in experts[0]}
    return CompressedBank.from_float(weights, slots_E, activation=activation)


def _biases(experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {b: torch.stack([e[b] for e in experts]) for b in ("b_gate", "b_up", "b_down") if b in experts[0]}


def _keep(moe: MoE, opts: CompressOptions) -> int:
    E = moe.config.num_experts
    if opts.keep_experts is not None:
        k = opts.keep_experts
    elif opts.target_memory is not None:
        k = groups_for_target(E, opts.target_memory)
    else:
        raise CompressionError("this method merges or drops experts: give keep_experts (--keep-experts N) or "
                               "target_memory (--target-memory 0.5)")
    if k > E:
        raise CompressionError(f"{moe.name}: keep_experts={k} exceeds its {E} experts; choose 1 to {E}")
    return k


def _bits(opts: CompressOptions, allowed: tuple[float, ...], default: float) -> float:
    if opts.bits is not None:
        bits = opts.bits
    elif opts.target_memory is not None:
        fitting = [b for b in allowed if b / 32 <= opts.target_memory + 1e-9]
        if not fitting:
            raise CompressionError(f"target_memory={opts.target_memory} is below what {min(allowed)} bits give "
                                   f"({min(allowed) / 32:.3f}); raise the target or use another method")
        bits = max(fitting)
    else:
        bits = default
    if bits not in allowed:
        raise CompressionError(f"bits={bits:g} is not supported by this method; choose one of "
                               f"{', '.join(f'{b:g}' for b in allowed)}")
    return bits


# ---- baselines -----------------------------------------------------------------------------------------------

def _apply_rtn(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    bits = int(_bits(opts, (2, 3, 4, 8), 8))
    experts = _stacked(moe)
    codes: dict[str, list] = {m: [rtn(e[m], bits) for e in experts] for m in ("w_gate", "w_up", "w_down") if m in experts[0]}
    slots = torch.arange(len(experts))
    install_bank(moe, CompressedBank.from_quantized(codes, slots, activation=moe.config.activation,
                                                    biases=_biases(experts)))


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


# ---- GPTQ / QMoE ---------------------------------------------------------------------------------------------

def _gptq_expert(w: dict[str, torch.Tensor], x_TD: torch.Tensor, make_grid, activation: str, percdamp: float):
    """Quantise one expert's matrices with GPTQ on its own routed tokens; RTN when it received none."""
    def quantise(m: str, inputs_TC: torch.Tensor):
        if inputs_TC.shape[0] == 0:
            grid = make_grid(w[m])
            return grid.quantize(w[m]), grid
        return gptq(w[m], hessian(inputs_TC), make_grid, percdamp=percdamp)

    out: dict[str, tuple[torch.Tensor, RowGrid]] = {m: quantise(m, x_TD) for m in ("w_gate", "w_up") if m in w}
    # w_down is calibrated on the hidden activations of the already quantised input projections
    deq = {m: grid.dequantize(q) for m, (q, grid) in out.items()}
    h_up = x_TD @ deq["w_up"].T + w.get("b_up", 0)
    h_gate = x_TD @ deq["w_gate"].T + w.get("b_gate", 0) if "w_gate" in deq else None
    out["w_down"] = quantise("w_down", hidden(activation, h_gate, h_up))
    return out


def _gptq_layer(moe: MoE, record: LayerRecord, opts: CompressOptions, make_grid) -> None:
    experts = _stacked(moe)
    codes: dict[str, list] = {m: [] for m in experts[0] if m.startswith("w_")}
    for e, w in enumerate(experts):
        q = _gptq_expert(w, record.tokens_of(e, opts.max_tokens_per_expert), make_grid, moe.config.activation,
                         opts.percdamp)
        for m, per_expert in codes.items():
            per_expert.append(q[m])
    bank = CompressedBank.from_quantized(codes, torch.arange(len(experts)), activation=moe.config.activation,
                                         biases=_biases(experts))
    install_bank(moe, bank)


def _apply_gptq(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    bits = int(_bits(opts, (2, 3, 4, 8), 4))
    _gptq_layer(moe, record, opts, lambda w: minmax_grid(w, bits))


def _apply_qmoe(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    bits = _bits(opts, (1.5, 2), 1.5)
    _gptq_layer(moe, record, opts, ternary_grid if bits == 1.5 else (lambda w: minmax_grid(w, 2)))
    if bits == 1.5 and opts.codec:
        from .codec import to_tunstall
        packed = moe.experts
        assert isinstance(packed, CompressedBank)
        coded = to_tunstall(packed, fit=opts.fit_codebook)
        # the dictionary assumes QMoE's ~88% zeros; where the codes are denser it would grow them: keep the smaller
        if coded.stored_bytes() < packed.stored_bytes():
            install_bank(moe, coded)


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


# ---- D²MoE MWQ -----------------------------------------------------------------------------------------------

def _apply_mwq(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    from .mwq import mwq_quantize
    bits = int(_bits(opts, (2, 3, 4, 5), 2))
    if opts.levels < 0:
        raise CompressionError(f"levels={opts.levels} must be >= 0 (residual planes above the base)")
    experts = _stacked(moe)
    mats: dict[str, list] = {m: [] for m in ("w_gate", "w_up", "w_down") if m in experts[0]}
    for e, w in enumerate(experts):
        x_TD = record.tokens_of(e, opts.max_tokens_per_expert)
        if x_TD.shape[0] == 0:
            x_TD = record.x_TD  # no routed token: fit on the whole layer input
        h_up = x_TD @ w["w_up"].T + w.get("b_up", 0)
        h_gate = x_TD @ w["w_gate"].T + w.get("b_gate", 0) if "w_gate" in w else None
        inputs = {"w_gate": x_TD, "w_up": x_TD, "w_down": hidden(moe.config.activation, h_gate, h_up)}
        for m, per_expert in mats.items():
            per_expert.append(mwq_quantize(w[m], hessian(inputs[m]), bits=bits, levels=opts.levels,
                                           group_size=opts.group_size))
    install_bank(moe, CompressedBank.from_mwq(mats, torch.arange(len(experts)), activation=moe.config.activation,
                                              biases=_biases(experts)))


# ---- EAQuant -------------------------------------------------------------------------------------------------

def _plan_eaquant(records, opts, layers: dict[str, MoE], model) -> dict:
    """Each layer's input norm, where the model is a moekit LanguageModel (the block's ``ffn_norm``)."""
    norms = {}
    for name, moe in layers.items():
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = model.get_submodule(parent_name)
        norm = getattr(parent, "ffn_norm", None)
        norms[name] = norm if getattr(parent, "ffn", None) is moe and getattr(norm, "weight", None) is not None else None
    return norms


def _apply_eaquant(moe: MoE, record: LayerRecord, opts: CompressOptions, plan) -> None:
    from .eaquant import (
        align_router,
        apply_smoothing,
        clip_search_grid,
        smoothing_scales,
    )
    bits = int(_bits(opts, (3, 4, 8), 4))
    norm = (plan or {}).get(record.name)
    x_TD = record.x_TD
    if norm is not None:
        s_D, _ = smoothing_scales(_stacked(moe), record)
        apply_smoothing(moe, norm, s_D)
        x_TD = x_TD / s_D  # the layer's inputs after the smoothed norm
    align_router(moe, x_TD)
    experts = _stacked(moe)
    codes: dict[str, list] = {m: [] for m in ("w_gate", "w_up", "w_down") if m in experts[0]}
    for e in experts:
        for m, per_expert in codes.items():
            grid = clip_search_grid(e[m], bits)
            per_expert.append((grid.quantize(e[m]), grid))
    install_bank(moe, CompressedBank.from_quantized(codes, torch.arange(len(experts)),
                                                    activation=moe.config.activation, biases=_biases(experts)))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "quantise", False, True, _apply_rtn,
           "baseline: round-to-nearest per output channel, int8 (--bits 8) or int4/3/2", default_bits=8),
    Method("prune-frequency", "reduce", False, True, _apply_prune,
           "baseline: drop each layer's least-routed experts (router rows too)"),
    Method("merge-random", "reduce", False, True, _apply_random_merge,
           "baseline: merge experts in random groups by plain averaging; router unchanged"),
    Method("m-smoe", "reduce", False, False, _apply_msmoe,
           "M-SMoE: frequency-guided groups, neuron alignment, frequency-weighted merging (spec §1)",
           plan=_plan_msmoe),
    Method("expert-merging", "reduce", False, False, _apply_expert_merging,
           "Expert Merging: M-SMoE groups merged with learned per-tensor coefficients on calibration data (spec §3)",
           plan=_plan_msmoe),
    Method("expert-merging++", "reduce", False, False, _apply_expert_merging_pp,
           "Expert Merging++: importance-guided chunk allocation of the coefficients, retrained (spec §3)",
           plan=_plan_msmoe),
    Method("dern", "reduce", False, False, _apply_dern,
           "DERN: drop the least important experts, move their similar neurons into kept experts, re-cluster (spec §2)"),
    Method("qmoe", "quantise", True, False, _apply_qmoe,
           "QMoE: per-expert-Hessian GPTQ to ternary (--bits 1.5, entropy-coded) or 2-bit (spec §4)",
           default_bits=1.5),
    Method("eaquant", "quantise", False, False, _apply_eaquant,
           "EAQuant (weights): expert-aware smoothing, router top-k KL alignment, clip-searched W4/W3 (spec §5)",
           plan=_plan_eaquant, default_bits=4),
    Method("d2moe-mwq", "quantise", True, False, _apply_mwq,
           "D²MoE MWQ: bit-nested experts, a --bits base plus binary residual planes (--levels), prefixes valid "
           "(spec §7)", default_bits=2),
    Method("gptq", "quantise", True, False, _apply_gptq,
           "GPTQ per expert on its routed tokens, int4 by default (--bits 2/3/4/8)", default_bits=4),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        import difflib
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CompressionError(f"unknown compression method {name!r}{hint}; available: {', '.join(METHODS)} "
                               f"(moekit compress --list)")
    return METHODS[name]


def expert_float_bytes(moe: MoE) -> float:
    """Bytes of a layer's experts stored in float32 (the reference every memory fraction is taken of)."""
    bank = moe.experts
    per = sum(r * c for r, c in ((bank.hidden_dim, bank.dim),) * (3 if bank.gated else 2))
    return 4 * per * bank.num_experts if not isinstance(bank, CompressedBank) else math.nan
