"""EAQuant: expert-aware post-training quantisation (Fu et al. 2025, arXiv 2506.13329; spec §5).

Dim legend: T tokens, D model dim, F expert hidden dim, E experts, K slots per token, R rows, C columns.

Three MoE-specific pieces on top of a per-output-channel asymmetric quantiser whose clipping ratio is searched
over 101 values in ``[0.35, 1]`` to minimise the weight MSE (the released code's ``per_channel_tensor``):

1. *Expert-aware smoothing aggregation*: per expert ``s^i_j = a^i_j^α / w^i_j^{1-α}`` with ``a^i_j = max |x_j|``
   over the tokens routed to expert ``i`` and ``w^i_j = max |W[:, j]|`` over its ``w_gate`` and ``w_up`` columns
   (α = 0.6); aggregated by an element-wise max over experts, ``s_j = max_i s^i_j``. Folded exactly: the layer's
   input norm weight is divided by ``s`` and the input columns of the router and of every expert's
   ``w_gate``/``w_up`` are multiplied by ``s``.
2. *Router logits distribution alignment*: the router weights are quantised to int8 per output channel with
   one clipping ratio chosen from the same 101 values to minimise ``KL(p_fp[topk] ‖ p_q[topk])`` (softmax over
   all E, both gathered at the FP top-k, no renormalisation, batch mean).
3. *Expert-level calibration balance*: each expert's statistics come from its own routed tokens, at most
   ``ratio · T·K/E`` of them (ratio 2.0); an expert that received none uses the whole layer input.

4. *``down_proj`` outlier smoothing* (:func:`down_smoothing_scales`): per expert, the channel maxima ``a_f`` of
   ``w_down``'s input over its routed tokens; outliers are channels above the interquartile fence
   ``q80 + 1.5·(q80 − q20)`` *and* above the Otsu threshold of the ``a_f`` (our reading of "refined by Otsu");
   they get ``s_f = (a_f / normal_max)^0.7``, every other channel 1. Folded exactly for gated activations
   (``w_up`` rows and biases ``/= s``, ``w_down`` columns ``*= s``); skipped for non-gated ones, where the
   hidden state is not linear in ``w_up``.

Activation quantisation (A4/A8, ``act_bits``) and the rotation (``rotate``) are :mod:`.actquant`'s: simulated
per-token symmetric quantisation with clipping 0.9 (the code's ``lac``) and a fixed block-Hadamard rotation
folded into the weights (after smoothing, before the clip search) in place of DuQuant's learned block rotations
and zig-zag permutation. Choices where this library differs from the released code (spec marks its pipeline as
W4A4 on OLMoE): symmetric rather than asymmetric activation quantisation; the router's activations stay float
(the code's router is W8A8); smoothing is applied only where the layer's input norm is known (a moekit
:class:`LanguageModel` block's ``ffn_norm``), and skipped (reported) elsewhere; the router is stored dequantised
in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MoE
from .calibrate import LayerRecord

__all__ = [
    "CLIP_RATIOS",
    "align_router",
    "apply_down_smoothing",
    "apply_smoothing",
    "balanced_tokens",
    "clip_search_grid",
    "down_smoothing_scales",
    "otsu_threshold",
    "router_topk_kl",
    "smoothing_scales",
]

CLIP_RATIOS = torch.linspace(0.35, 1.0, 101)


def balanced_tokens(record: LayerRecord, e: int, ratio: float = 2.0) -> torch.Tensor:
    """Expert ``e``'s calibration inputs: its routed tokens capped at ``ratio·T·K/E``, or the whole layer input."""
    T, K = record.expert_ids_TK.shape
    cap = max(1, int(ratio * T * K / record.num_experts))
    x = record.tokens_of(e, cap)
    return x if x.shape[0] > 0 else record.x_TD


def smoothing_scales(weights: list[dict[str, torch.Tensor]], record: LayerRecord, alpha: float = 0.6,
                     ratio: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_D, per_expert_ED)``: the max-aggregated SmoothQuant scale and each expert's own."""
    per = []
    for e, w in enumerate(weights):
        a_D = balanced_tokens(record, e, ratio).abs().amax(dim=0).clamp_min(1e-5)
        cols = torch.cat([w[m] for m in ("w_gate", "w_up") if m in w]).abs().amax(dim=0).clamp_min(1e-5)
        per.append(a_D.pow(alpha) / cols.pow(1 - alpha))
    per_ED = torch.stack(per)
    return per_ED.amax(dim=0), per_ED


@torch.no_grad()
def apply_smoothing(moe: MoE, norm: nn.Module, s_D: torch.Tensor) -> None:
    """Fold ``s`` in exactly: ``norm.weight /= s``; router and expert input columns ``*= s``."""
    weight = norm.weight
    assert isinstance(weight, torch.Tensor), "the input norm has no weight to fold the scale into"
    weight.div_(s_D.to(weight))
    moe.router.weight.mul_(s_D.to(moe.router.weight))
    for m in ("w_gate", "w_up"):
        p = getattr(moe.experts, m, None)
        if p is not None:
            p.mul_(s_D.to(p))


def clip_search_grid(w_RC: torch.Tensor, bits: int, ratios: torch.Tensor = CLIP_RATIOS):
    """Per-row asymmetric grid whose clipping ratio minimises each row's weight MSE."""
    from .quant import RowGrid
    w = w_RC.float()
    lo0, hi0 = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    best_err = torch.full((w.shape[0],), float("inf"))
    best_scale, best_zero = torch.ones_like(lo0), torch.zeros_like(lo0)
    levels = 2 ** bits - 1
    for r in ratios.tolist():
        lo, hi = lo0 * r, hi0 * r
        scale = torch.where(hi - lo > 0, (hi - lo) / levels, torch.ones_like(lo))
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, levels)
        err = ((q - zero[:, None]) * scale[:, None] - w).square().sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return RowGrid("minmax", bits, scale_R=best_scale, zero_R=best_zero)


def router_topk_kl(logits_fp_TE: torch.Tensor, logits_q_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``KL(p_fp[topk] ‖ p_q[topk])``: softmax over all E, gathered at the FP top-k, batch mean."""
    p = F.softmax(logits_fp_TE.float(), -1)
    q = F.softmax(logits_q_TE.float(), -1)
    idx = p.topk(top_k, dim=-1).indices
    p_k, q_k = p.gather(-1, idx), q.gather(-1, idx)
    return (p_k * (p_k.clamp_min(1e-30).log() - q_k.clamp_min(1e-30).log())).sum(-1).mean()


def _fake_quant(w_RC: torch.Tensor, bits: int, ratio: float) -> torch.Tensor:
    lo, hi = w_RC.min(1).values.clamp(max=0) * ratio, w_RC.max(1).values.clamp(min=0) * ratio
    levels = 2 ** bits - 1
    scale = torch.where(hi - lo > 0, (hi - lo) / levels, torch.ones_like(lo))
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w_RC / scale[:, None]) + zero[:, None], 0, levels)
    return (q - zero[:, None]) * scale[:, None]


@torch.no_grad()
def align_router(moe: MoE, x_TD: torch.Tensor, bits: int = 8) -> float:
    """Quantise the router (int8 per channel) with the clipping ratio of least top-k KL; return that ratio."""
    w = moe.router.weight.detach().float()
    fp = moe.router.logits(x_TD)
    bias = moe.router.bias if isinstance(moe.router.bias, torch.Tensor) else None
    best, best_ratio = float("inf"), 1.0
    for r in CLIP_RATIOS.tolist():
        wq = _fake_quant(w, bits, r)
        logits = F.linear(x_TD.float(), wq, None if bias is None else bias.float())
        kl = float(router_topk_kl(fp, logits, moe.config.top_k))
        if kl < best:
            best, best_ratio = kl, r
    moe.router.weight.copy_(_fake_quant(w, bits, best_ratio).to(moe.router.weight))
    return best_ratio


def otsu_threshold(v_N: torch.Tensor) -> float:
    """The threshold splitting ``v`` into two classes of maximal between-class variance (Otsu 1979)."""
    v = v_N.float().sort().values
    n = v.numel()
    if n < 2:
        return float(v.max()) if n else 0.0
    k = torch.arange(1, n, dtype=torch.float32)  # class sizes below each split
    csum = torch.cumsum(v, 0)[:-1]
    mean_lo, mean_hi = csum / k, (v.sum() - csum) / (n - k)
    between = k * (n - k) * (mean_lo - mean_hi).square()
    i = int(between.argmax())
    return float((v[i] + v[i + 1]) / 2)


def down_smoothing_scales(w: dict[str, torch.Tensor], x_TD: torch.Tensor, activation: str,
                          power: float = 0.7) -> torch.Tensor:
    """``s_F`` for one expert's ``w_down`` input: ``(a_f / normal_max)^power`` on the outlier channels, else 1."""
    from ..experts.activations import hidden
    h_up = x_TD @ w["w_up"].T + w.get("b_up", 0)
    h_gate = x_TD @ w["w_gate"].T + w.get("b_gate", 0) if "w_gate" in w else None
    a_F = hidden(activation, h_gate, h_up).abs().amax(dim=0) if x_TD.shape[0] else torch.zeros(h_up.shape[1])
    q20, q80 = torch.quantile(a_F, 0.2), torch.quantile(a_F, 0.8)
    limit = max(float(q80 + 1.5 * (q80 - q20)), otsu_threshold(a_F))
    outlier_F = a_F > limit
    s_F = torch.ones_like(a_F)
    if outlier_F.any() and (~outlier_F).any():
        normal_max = float(a_F[~outlier_F].max())
        if normal_max > 0:
            s_F[outlier_F] = (a_F[outlier_F] / normal_max).pow(power)
    return s_F


def apply_down_smoothing(w: dict[str, torch.Tensor], s_F: torch.Tensor) -> None:
    """Fold ``s_F`` into one gated expert (in place): ``w_up`` rows and ``b_up`` ``/= s``, ``w_down`` columns
    ``*= s``; the expert's function is unchanged."""
    w["w_up"] = w["w_up"] / s_F[:, None]
    if "b_up" in w:
        w["b_up"] = w["b_up"] / s_F
    w["w_down"] = w["w_down"] * s_F[None, :]
