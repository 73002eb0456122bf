"""Quantising methods: GPTQ per expert, QMoE (spec §4), D²MoE MWQ (spec §7) and EAQuant (spec §5).

Dim legend: E experts, T tokens, D model dim, R rows, C columns.
"""

from __future__ import annotations

import torch

from ..experts.activations import hidden
from ..layers import MoE
from .bank import CompressedBank
from .calibrate import CompressionError, LayerRecord
from .gptq import gptq, hessian
from .options import CompressOptions, _biases, _bits, _rotated, _stacked, _with_activation
from .quant import RowGrid, minmax_grid, ternary_grid
from .surgery import install_bank

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
        apply_down_smoothing,
        apply_smoothing,
        balanced_tokens,
        clip_search_grid,
        down_smoothing_scales,
        smoothing_scales,
    )
    bits = int(_bits(opts, (3, 4, 8), 4))
    norm = (plan or {}).get(record.name)
    x_TD = record.x_TD
    s_D = torch.ones(x_TD.shape[1])
    if norm is not None:
        s_D, _ = smoothing_scales(_stacked(moe), record)
        apply_smoothing(moe, norm, s_D)
        x_TD = x_TD / s_D  # the layer's inputs after the smoothed norm
    align_router(moe, x_TD)
    experts = _stacked(moe)
    if opts.down_smooth and "w_gate" in experts[0]:  # exact only where the hidden state is linear in w_up's rows
        for e, w in enumerate(experts):
            x_e = balanced_tokens(record, e) / s_D
            apply_down_smoothing(w, down_smoothing_scales(w, x_e, moe.config.activation))
    experts = [_rotated(w, opts) for w in experts]
    codes: dict[str, list] = {m: [] for m in ("w_gate", "w_up", "w_down") if m in experts[0]}
    for w in experts:
        for m, per_expert in codes.items():
            grid = clip_search_grid(w[m], bits)
            per_expert.append((grid.quantize(w[m]), grid))
    bank = CompressedBank.from_quantized(codes, torch.arange(len(experts)), activation=moe.config.activation,
                                         biases=_biases(experts))
    install_bank(moe, _with_activation(bank, opts))
