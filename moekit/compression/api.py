"""``compress(model, method, calibration, ...)``: the library entry point behind ``moekit compress``.

Dim legend: N calibration sequences, S sequence length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .bank import CompressedBank
from .calibrate import CompressionError, calibrate, check_calibration, find_moe_layers
from .methods import CompressOptions, expert_float_bytes, get_method

__all__ = ["CompressionReport", "compress", "expert_bytes"]


@dataclass
class CompressionReport:
    """What a compression did: per layer, and the expert bytes before and after.

    ``bits_per_param`` is the stored expert bits (codes, scales, codebook excluded) per original expert weight.
    """

    method: str
    options: dict
    layers: dict[str, dict] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    expert_params: int = 0

    @property
    def memory_fraction(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes_after / max(self.expert_params, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_fraction": self.memory_fraction, "bits_per_param": self.bits_per_param}


def expert_bytes(model: nn.Module) -> int:
    """Bytes of every MoE layer's routed experts as stored now (float banks count their parameters)."""
    total = 0
    for _, moe in find_moe_layers(model):
        bank = moe.experts
        if isinstance(bank, CompressedBank):
            total += bank.stored_bytes()
        else:
            total += sum(p.numel() * p.element_size() for p in bank.parameters())
    return total


def compress(model: nn.Module, method: str, calibration: torch.Tensor, *, bits: float | None = None,
             keep_experts: int | None = None, target_memory: float | None = None, batch_size: int = 8,
             **options) -> CompressionReport:
    """Compress every MoE layer of ``model`` in place with ``method``.

    Args:
        model: a :class:`~moekit.models.LanguageModel`, or a transformers model patched by
            :func:`moekit.hf.patch`.
        method: a name of :data:`~.methods.METHODS` (``moekit compress --list``).
        calibration: int64 token ids ``[N, S]`` (at least 64 tokens).
        bits / keep_experts / target_memory / options: see :class:`~.methods.CompressOptions`.

    Returns:
        A :class:`CompressionReport`. The model's layers now hold :class:`~.bank.CompressedBank` experts.

    Arguments are checked before any layer changes; an error raised while a layer is being compressed can leave
    the model partly compressed, so reload it before trying again (``moekit compress`` writes nothing then).
    """
    m = get_method(method)
    if m.kind == "train":  # MoTE: a whole-run QAT, not a per-layer transform
        m.apply(None, None, None, None)
    opts = CompressOptions(bits=bits, keep_experts=keep_experts, target_memory=target_memory, **options)
    layers = find_moe_layers(model)
    if not layers:
        raise CompressionError(f"{type(model).__name__} has no moekit MoE layers; train an MoE preset, or patch a "
                               f"transformers model first with moekit.hf.patch(model)")
    tokens_NS = check_calibration(calibration)
    done = [name for name, moe in layers if isinstance(moe.experts, CompressedBank)]
    if done:
        raise CompressionError(f"{done[0]} is already compressed; compress the original model instead")
    if m.kind == "quantise" and keep_experts is not None:
        raise CompressionError(f"{method} quantises experts and keeps them all; drop keep_experts and give bits or "
                               f"target_memory")
    if m.kind == "reduce" and bits is not None:
        raise CompressionError(f"{method} merges or drops experts and keeps float weights; drop bits and give "
                               f"keep_experts or target_memory")
    if (opts.act_bits not in (0, 16) or opts.rotate) and method not in ("rtn", "eaquant"):
        raise CompressionError(f"{method} does not quantise activations; act_bits / rotate (--act-bits, --rotate) "
                               f"are for rtn and eaquant")
    report = CompressionReport(method, asdict(opts))
    for name, moe in layers:
        report.bytes_before += int(expert_float_bytes(moe))
        report.expert_params += int(expert_float_bytes(moe)) // 4
        report.layers[name] = {"experts_before": moe.config.num_experts}
    layer_of = dict(layers)
    if m.sequential:
        for name, moe in layers:  # later layers are calibrated on the compressed earlier ones (QMoE)
            record = calibrate(model, tokens_NS, batch_size=batch_size, layers=[name])[name]
            m.apply(moe, record, opts, None)
    else:
        records = calibrate(model, tokens_NS, batch_size=batch_size)
        plan = m.plan(records, opts, layer_of, model) if m.plan is not None else None
        for name, moe in layers:
            m.apply(moe, records[name], opts, plan)
    for name, moe in layers:
        bank = moe.experts
        assert isinstance(bank, CompressedBank)
        report.layers[name].update(experts_after=moe.config.num_experts, stored_experts=bank.spec.num_stored,
                                   format=bank.spec.format, bits=bank.spec.bits, bytes=bank.stored_bytes())
        report.bytes_after += bank.stored_bytes()
    return report
