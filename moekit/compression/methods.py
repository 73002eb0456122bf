"""The compression methods and baselines, by name (:data:`METHODS`), each a transform of one MoE layer given its
calibration record; the transforms live in :mod:`.baselines`, :mod:`.merging` and :mod:`.quantisation`.

Every method ends with :func:`~.surgery.install_bank` (and, when it drops experts, :func:`~.surgery.prune_router`),
so the layer keeps its calling convention, router semantics and statistics.
"""

from __future__ import annotations

import math

from ..layers import MoE
from .bank import CompressedBank
from .baselines import _apply_prune, _apply_random_merge, _apply_rtn
from .calibrate import CompressionError
from .mcsmoe import _apply_mcsmoe, _plan_mcsmoe
from .merging import _apply_dern, _apply_expert_merging, _apply_expert_merging_pp, _apply_msmoe, _plan_msmoe
from .options import CompressOptions, Method
from .quantisation import _apply_eaquant, _apply_gptq, _apply_mwq, _apply_qmoe, _plan_eaquant

__all__ = ["METHODS", "CompressOptions", "Method", "get_method"]


def _apply_mote(moe, record, opts, plan) -> None:
    raise CompressionError("mote trains a dense run rather than transforming MoE layers; run moekit compress RUN "
                           "--method mote --out DIR (moekit.compression.mote.compress_mote_run)")


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
    Method("mc-smoe", "reduce", False, False, _apply_mcsmoe,
           "MC-SMoE: M-SMoE merging, then low-rank + row-sparse experts distilled on routed tokens (spec §1)",
           plan=_plan_mcsmoe),
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
           "EAQuant: expert-aware smoothing, router top-k KL alignment, clip-searched W4/W3, --act-bits/--rotate (spec §5)",
           plan=_plan_eaquant, default_bits=4),
    Method("d2moe-mwq", "quantise", True, False, _apply_mwq,
           "D²MoE MWQ: bit-nested experts, a --bits base plus binary residual planes (--levels), prefixes valid "
           "(spec §7)", default_bits=2),
    Method("mote", "train", False, False, _apply_mote,
           "MoTE: upcycle a dense run to a frozen shared FFN + top-1 ternary experts, QAT for --steps (spec §6)"),
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
