"""Conversions between transformers blocks and moekit layers: round trips reproduce the model, and a conversion
that would drop, duplicate or mis-shape an expert weight raises instead of producing a model.

Run: python -m pytest tests/test_hf_roundtrip.py -q
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import moekit  # noqa: E402
import moekit.hf as mh  # noqa: E402
from moekit.hf.tiny import ARCHITECTURES, tiny_model  # noqa: E402

IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))


def scramble_moe_blocks(model: nn.Module) -> None:
    with torch.no_grad():
        for _, block, _ in mh.find_blocks(model):
            for t in block.state_dict(keep_vars=True).values():
                t.normal_()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_to_moekit_from_moekit_round_trip(arch: str) -> None:
    model = tiny_model(arch)
    want = model(IDS).logits
    layers = mh.to_moekit(model, copy=True)
    assert all(isinstance(m, moekit.MoE) for m in layers.values())
    # each layer alone computes its block's output
    name, block, _ = next(mh.find_blocks(model))
    x = torch.randn(1, 5, block_dim(model))
    y_hf = block(x)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf
    torch.testing.assert_close(layers[name](x), y_hf, rtol=1e-5, atol=1e-5)
    # writing the layers into a model whose MoE weights were destroyed restores it
    other = copy.deepcopy(model)
    scramble_moe_blocks(other)
    assert not torch.allclose(other(IDS).logits, want)
    torch.testing.assert_close(mh.from_moekit(other, layers)(IDS).logits, want, rtol=1e-5, atol=1e-5)


def block_dim(model: nn.Module) -> int:
    return model.config.hidden_size


@pytest.mark.parametrize("arch", ["qwen2_moe", "gpt_oss"])
def test_patch_unpatch_round_trip_keeps_training_updates(arch: str) -> None:
    model = tiny_model(arch)
    patched = mh.patch(copy.deepcopy(model))
    with torch.no_grad():  # an update made through moekit survives unpatching
        for moe in mh.to_moekit(patched).values():
            moe.experts.w_up.mul_(1.5)
    updated = patched(IDS, output_router_logits=True)
    restored = mh.unpatch(patched)
    assert not any(isinstance(m, mh.PatchedMoEBlock) for m in restored.modules())
    assert len(list(mh.find_blocks(restored))) == len(list(mh.find_blocks(model)))
    again = restored(IDS, output_router_logits=True)
    torch.testing.assert_close(again.logits, updated.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.aux_loss, updated.aux_loss)  # transformers re-hooks its own routers
    assert not torch.allclose(again.logits, model(IDS).logits)


def test_extra_block_weight_raises() -> None:
    model = tiny_model("mixtral")
    block = model.model.layers[0].mlp
    block.experts.extra_scale = nn.Parameter(torch.ones(8))
    with pytest.raises(mh.ConversionError, match="extra_scale.*would be dropped"):
        mh.patch(model)


def test_adapter_that_drops_an_expert_weight_raises(monkeypatch) -> None:
    """A mapping bug (up projection read from the gate half) keeps every shape: the round trip catches it."""
    from moekit.hf import layouts, qwen3_moe

    def buggy(hf, prefix="experts."):
        out = layouts.packed_experts_to_moekit(hf, prefix)
        out["experts.w_up"] = out["experts.w_gate"]
        return out

    monkeypatch.setattr(qwen3_moe, "packed_experts_to_moekit", buggy)
    with pytest.raises(mh.ConversionError, match="gate_up_proj.*not reproduced"):
        mh.to_moekit(tiny_model("qwen3_moe"))


def test_adapter_that_mis_shapes_raises() -> None:
    from moekit.hf import qwen3_moe

    def transposed(hf, cfg):
        out = {"router.weight": hf["gate.weight"], **qwen3_moe.packed_experts_to_moekit(hf)}
        out["experts.w_down"] = out["experts.w_down"].transpose(1, 2)
        return out

    adapter = replace(qwen3_moe.ADAPTER, to_moekit=transposed)
    block = tiny_model("qwen3_moe").model.layers[0].mlp
    with pytest.raises(mh.ConversionError, match="w_down.*shape"):
        mh.convert_block(block, adapter)


def test_from_moekit_rejects_mismatched_layers() -> None:
    model = tiny_model("olmoe")
    layers = mh.to_moekit(model, copy=True)
    name = next(iter(layers))
    wrong_k = dict(layers)
    wrong_k[name] = moekit.MoE(replace(layers[name].config, top_k=3), name=name)
    with pytest.raises(mh.ConversionError, match="top_k: layer 3 vs block 2"):
        mh.from_moekit(model, wrong_k)
    missing = {k: v for k, v in layers.items() if k != name}
    with pytest.raises(mh.ConversionError, match="blocks without a layer"):
        mh.from_moekit(model, missing)
    before = model(IDS).logits
    with pytest.raises(mh.ConversionError):
        mh.from_moekit(model, wrong_k)
    torch.testing.assert_close(model(IDS).logits, before)  # nothing was written
    # settings that do not change the function (engine, loss coefficients) are not a mismatch
    relaxed = dict(layers)
    cfg = layers[name].config
    relaxed[name] = moekit.MoE(replace(cfg, engine="reference", router=replace(cfg.router, z_loss_coef=1e-3)))
    relaxed[name].load_state_dict(layers[name].state_dict())
    torch.testing.assert_close(mh.from_moekit(model, relaxed)(IDS).logits, before)
