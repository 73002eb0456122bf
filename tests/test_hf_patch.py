"""``moekit.hf.patch``: a patched transformers model computes what the original computes.

For every supported architecture, a tiny random model is built from its config class (nothing downloaded) and
compared before and after patching: logits and transformers' own aux loss (from the router logits it records),
then the gradients of the input embeddings and of every MoE weight (router, experts, shared experts) after a
backward through transformers' loss (language-model loss plus aux loss). Greedy generation is compared token
for token, and the routing statistics gathered through ``routing_context`` are checked against the routing.

Run: python -m pytest tests/test_hf_patch.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit.hf as mh  # noqa: E402
from moekit.hf.tiny import ARCHITECTURES, tiny_model  # noqa: E402

TOL = dict(rtol=1e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=2e-5)


def run(model, ids, **kw):
    out = model(ids, output_router_logits=True, **kw)
    return out


def hf_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of every MoE block tensor under its transformers name, whether patched or not."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, mh.PatchedMoEBlock):
            moe = module.moe
            grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in moe.named_parameters()}
            tensors = mh.ADAPTERS[module.adapter_name].to_hf({**moe.state_dict(), **grads}, moe.config)
            out.update({f"{name}.{k}": v for k, v in tensors.items()})
        elif mh.adapter_for(module) is not None:
            out.update({f"{name}.{k}": t.grad for k, t in module.state_dict(keep_vars=True).items()})
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_and_aux_loss_agree(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    patched = mh.patch(copy.deepcopy(model))  # patched before its first forward: hooks installed by patch
    before, after = run(model, ids), run(patched, ids)
    assert not any(mh.adapter_for(m) for m in patched.modules()), "every sparse block is replaced"
    torch.testing.assert_close(after.logits, before.logits, **TOL)
    aux_before = getattr(before, "aux_loss", None)  # DeepSeek-V3 has none (older releases lack the field)
    if aux_before is not None:
        assert aux_before > 0
        torch.testing.assert_close(after.aux_loss, aux_before, **TOL)
    # patching after a forward (transformers' hooks already installed) works the same
    torch.testing.assert_close(getattr(run(mh.patch(model), ids), "aux_loss", None), aux_before)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_agree(arch: str) -> None:
    model = tiny_model(arch).train()
    patched = mh.patch(copy.deepcopy(model))
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, patched):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, labels=ids, output_router_logits=True)
        out.loss.backward()
        grads.append({"inputs_embeds": emb.grad, **hf_grads(m)})
    ref, got = grads
    assert set(ref) == set(got) and len(ref) > 3
    for key in ref:
        if ref[key] is None:  # buffers (DeepSeek's correction bias) have no gradient
            continue
        assert ref[key].abs().sum() > 0 or "bias" in key, f"{key}: reference gradient is zero, test is vacuous"
        torch.testing.assert_close(got[key], ref[key], **GRAD_TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_greedy_generation_is_unchanged(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(2, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kw)
    got = mh.patch(copy.deepcopy(model), engine="reference").generate(ids, **kw)
    assert torch.equal(got, want)


def test_patch_shares_storage_and_keeps_dense_layers() -> None:
    model = tiny_model("deepseek_v3")
    block = model.model.layers[1].mlp
    gate_up, router_w, bias = block.experts.gate_up_proj, block.gate.weight, block.gate.e_score_correction_bias
    mh.patch(model)
    assert type(model.model.layers[0].mlp).__name__ == "DeepseekV3MLP", "first_k_dense_replace layers stay dense"
    moe = model.model.layers[1].mlp.moe
    assert moe.router.weight is router_w, "same-layout tensors keep their Parameter object"
    assert moe.router.expert_bias is bias
    assert moe.experts.w_gate.data_ptr() == gate_up.data_ptr()
    assert moe.experts.w_up.data_ptr() == gate_up[:, moe.config.hidden_dim].data_ptr()
    with torch.no_grad():  # an in-place update through moekit is seen by the checkpoint tensor
        moe.experts.w_up[0, 0, 0] = 123.0
    assert gate_up[0, moe.config.hidden_dim, 0] == 123.0


def test_routing_context_records_every_layer() -> None:
    model = mh.patch(tiny_model("qwen2_moe", num_layers=3))
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(4))
    with mh.routing_context(model) as ctx:
        model(ids)
    names = [n for n, m in model.named_modules() if isinstance(m, mh.PatchedMoEBlock)]
    assert list(ctx.stats) == names and len(names) == 2  # layer 0 is dense (mlp_only_layers)
    for stats in ctx.stats.values():
        assert stats.counts_E.sum() == 2 * 10 * 2
    assert "aux_loss" in ctx.losses and "load_cv" in ctx.stats_table()
    assert all(m.ctx is None for m in model.modules() if isinstance(m, mh.PatchedMoEBlock))


def test_patch_rejects_models_without_moe_blocks() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="no sparse-MoE block.*MixtralSparseMoeBlock"):
        mh.patch(model)


def test_strided_views_are_flagged_for_grouped_mm_and_copy_fixes_them() -> None:
    from moekit.dispatch.sorted import _grouped_mm_layout_problem

    model = tiny_model("gpt_oss", dim=64, hidden_dim=32)
    viewed = mh.patch(copy.deepcopy(model))
    copied = mh.patch(copy.deepcopy(model), copy=True)
    moe_v, moe_c = (next(m.moe for m in x.modules() if isinstance(m, mh.PatchedMoEBlock)) for x in (viewed, copied))
    assert "w_gate" in _grouped_mm_layout_problem(moe_v.experts)
    assert _grouped_mm_layout_problem(moe_c.experts) is None and moe_c.experts.w_up.is_contiguous()
    ids = torch.randint(0, 101, (1, 6))
    torch.testing.assert_close(copied(ids).logits, viewed(ids).logits, **TOL)
