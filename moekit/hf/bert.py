"""BERT-style encoders (transformers ``BertLayer``): turn each layer's dense FFN into a moekit MoE.

transformers names: ``layer.intermediate.dense`` (``Linear(D, F)`` with bias) followed by
``intermediate_act_fn``, then ``layer.output.dense`` (``Linear(F, D)`` with bias), dropout, and
``LayerNorm(ffn + attention_output)``. The FFN is replaced by putting the moekit module (which returns the
``[..., D]`` FFN output) in place of ``intermediate`` and an ``nn.Identity`` in place of ``output.dense``, so
the residual, dropout and LayerNorm of ``BertOutput`` run unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compression.upcycle import DenseFFN, moefy, sparse_upcycle

__all__ = ["ffn_layers", "dense_ffn", "calibration_inputs", "upcycle_bert", "sentence_embeddings"]

_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}


def ffn_layers(model: nn.Module) -> list[tuple[str, Any]]:  # transformers' BertLayer
    """``(name, layer)`` of every BERT layer whose FFN is still dense."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "intermediate", None), nn.Module)
            and isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear)
            and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear)]


def dense_ffn(layer: Any, hidden_act: str) -> DenseFFN:  # transformers' BertLayer
    """The layer's FFN as a :class:`DenseFFN` (views of the layer's weights, no copy)."""
    if hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={hidden_act!r} has no moekit activation; supported: {sorted(_ACTIVATIONS)}")
    up, down = layer.intermediate.dense, layer.output.dense
    return DenseFFN(w_up=up.weight.detach(), b_up=None if up.bias is None else up.bias.detach(),
                    w_down=down.weight.detach(), b_down=None if down.bias is None else down.bias.detach(),
                    activation=_ACTIVATIONS[hidden_act])


def _batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int):
    for start in range(0, len(texts), batch_size):
        yield tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")


@torch.no_grad()
def calibration_inputs(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                       max_length: int = 128) -> list[torch.Tensor]:
    """The FFN input of every layer on ``texts``, padding removed: one ``[N, D]`` tensor per layer."""
    layers = ffn_layers(model)
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def hook(i):
        return lambda module, args: store[i].append(args[0][state["mask"]])

    handles = [layer.intermediate.register_forward_pre_hook(hook(i)) for i, (_, layer) in enumerate(layers)]
    try:
        for batch in _batches(tokenizer, texts, batch_size, max_length):
            state["mask"] = batch["attention_mask"].bool()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(chunks) for chunks in store]


def upcycle_bert(model: nn.Module, num_experts: int, top_k: int, *, method: str = "split",
                 calib_inputs: Sequence[torch.Tensor] | None = None, split: str = "coactivation",
                 noise_std: float = 0.0, engine: str = "auto", seed: int = 0) -> nn.Module:
    """Replace every BERT layer's dense FFN, in place, by a moekit MoE built from its weights.

    Args:
        method: ``upcycle`` (E copies, new router: equal to the dense FFN for any k until trained) or
            ``split`` (neuron groups, summed: equal to the dense FFN when ``top_k == num_experts``).
        calib_inputs: per-layer FFN inputs (see :func:`calibration_inputs`); required by ``split``.
        split: how ``split`` groups neurons: ``coactivation`` clustering or ``random``.
    """
    hf_config: Any = model.config  # transformers' BertConfig
    hidden_act = hf_config.hidden_act
    layers = ffn_layers(model)
    if not layers:
        raise ValueError(f"no dense BERT FFN found in {type(model).__name__}")
    if method == "split" and (calib_inputs is None or len(calib_inputs) != len(layers)):
        raise ValueError(f"method='split' needs calib_inputs for each of the {len(layers)} layers; "
                         f"get them with moekit.hf.bert.calibration_inputs(model, tokenizer, texts)")
    for i, (name, layer) in enumerate(layers):
        ffn = dense_ffn(layer, hidden_act)
        new: nn.Module
        if method == "split":
            assert calib_inputs is not None  # checked above
            new = moefy(ffn, calib_inputs[i], num_experts, top_k, method=split, seed=seed, engine=engine,
                        name=f"{name}.ffn")
        elif method == "upcycle":
            new = sparse_upcycle(ffn, num_experts, top_k, noise_std=noise_std, seed=seed + i, engine=engine,
                                 name=f"{name}.ffn")
        else:
            raise ValueError(f"method={method!r} is not one of ['split', 'upcycle']")
        layer.intermediate = new.train(layer.training)
        layer.output.dense = nn.Identity()
    return model


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``[N, D]`` (sentence-transformers' MiniLM pooling)."""
    out = []
    for batch in _batches(tokenizer, texts, batch_size, max_length):
        h_BSD = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h_BSD.dtype)
        out.append(F.normalize((h_BSD * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)
