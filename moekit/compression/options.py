"""Settings of a compression (:class:`CompressOptions`), the :class:`Method` record, and the helpers every
method shares (stacking a layer's expert weights, building float banks, resolving ``keep_experts`` / ``bits``).

Dim legend: E experts, G stored experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layers import MoE
from .bank import CompressedBank, expert_weights
from .calibrate import CompressionError
from .merge import groups_for_target

__all__ = ["CompressOptions", "Method"]


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
        rank / final_threshold / lowrank_steps / lowrank_lr: MC-SMoE's second stage: the rank of ``L R`` (None:
            solved from ``target_memory``, else 32), the kept fraction of S's rows (README: 0.10), and the
            distillation steps and AdamW learning rate per merged expert.
        act_bits / act_clip / rotate: ``rtn`` and ``eaquant`` only: simulated per-token activation quantisation
            of every expert projection's input (0: none; 4 or 8: A4/A8) with clipping ratio ``act_clip``
            (EAQuant's ``lac`` 0.9), and a block-Hadamard rotation folded into the expert weights and applied
            online to their inputs (:mod:`.actquant`). Stored in the bank's header, so eval applies them.
        down_smooth: ``eaquant`` only: per-expert outlier smoothing of ``w_down``'s input (spec §5 step 1).
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
    rank: int | None = None
    final_threshold: float = 0.10
    lowrank_steps: int = 40
    lowrank_lr: float = 1e-3
    act_bits: int = 0
    act_clip: float = 0.9
    rotate: bool = False
    down_smooth: bool = True

    def __post_init__(self) -> None:
        from .actquant import ACT_BITS
        if self.act_bits not in ACT_BITS:
            raise CompressionError(f"act_bits={self.act_bits} is not supported; choose one of "
                                   f"{', '.join(map(str, ACT_BITS))} (0 or 16: activations stay float)")
        if not 0 < self.act_clip <= 1:
            raise CompressionError(f"act_clip={self.act_clip} must be in (0, 1], a fraction of each token's "
                                   f"absolute maximum (EAQuant uses 0.9)")
        if self.target_memory is not None and not 0 < self.target_memory <= 1:
            raise CompressionError(f"target_memory={self.target_memory} must be in (0, 1], a fraction of the float "
                                   f"expert bytes (e.g. 0.5)")
        if self.keep_experts is not None and self.keep_experts < 1:
            raise CompressionError(f"keep_experts={self.keep_experts} must be at least 1; keeping 0 experts "
                                   f"leaves nothing to route to")
        if self.percdamp < 0:
            raise CompressionError(f"percdamp={self.percdamp} must be >= 0 (QMoE uses 0.1)")
        if self.rank is not None and self.rank < 1:
            raise CompressionError(f"rank={self.rank} must be at least 1 (MC-SMoE's README uses 32)")
        if not 0 < self.final_threshold <= 1:
            raise CompressionError(f"final_threshold={self.final_threshold} must be in (0, 1], the kept fraction "
                                   f"of S's rows (MC-SMoE's README uses 0.10)")
        if self.lowrank_steps < 0:
            raise CompressionError(f"lowrank_steps={self.lowrank_steps} must be >= 0")


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


def _with_activation(bank: CompressedBank, opts: CompressOptions) -> CompressedBank:
    """Record the activation quantisation and rotation of ``opts`` in the bank's spec (and so in the header)."""
    import dataclasses
    act = 0 if opts.act_bits == 16 else opts.act_bits
    bank.spec = dataclasses.replace(bank.spec, act_bits=act, act_clip=opts.act_clip, rotate=opts.rotate)
    return bank


def _rotated(w: dict[str, torch.Tensor], opts: CompressOptions) -> dict[str, torch.Tensor]:
    """The expert's weight matrices with the rotation folded into their input columns (``W H``) when asked."""
    if not opts.rotate:
        return w
    from .actquant import rotate
    return {k: rotate(v) if k.startswith("w_") else v for k, v in w.items()}
