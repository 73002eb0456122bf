"""moekit.adapters: apply / freeze / save / load / merge, peft equivalence, routing through the RoutingContext,
transformers models, and every bad input of the issue (one clear error each, base weights untouched)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moekit import adapters
from moekit.models import LanguageModel, ModelConfig
from moekit.types import RoutingContext

TINY = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=2, context=16, moe=None, dense_hidden_dim=48)

# Per method: targets in moekit's LM and a small config with the method's trainable update made non-zero.
METHODS = {
    "lora": (None, {"rank": 4, "alpha": 8.0}),
    "mixlora": (["ffn"], {"num_experts": 4, "top_k": 2, "rank": 4}),
    "lora_mixer": (None, {"num_experts": 4, "top_k": 2, "rank": 4}),
    "dynmole": (None, {"num_experts": 4, "rank": 4}),
    "flylora": (None, {"rank": 8, "top_k": 2, "alpha": 16.0}),
    "poly": (None, {"num_skills": 3, "rank": 4}),
    "mhr": (None, {"num_skills": 3, "rank": 4, "num_heads": 2}),
    "rank1": (None, {"rank": 4, "top_k": 2}),
    "mos": (None, {"rank": 4, "num_shards": 2}),
    "sema": (None, {"bottleneck": 4, "descriptor_dim": 8}),
    "mome": (None, {"num_experts": 3, "top_k": 2, "rank": 2}),
    "glider": (None, {"num_experts": 3, "top_k": 2, "rank": 4, "train_experts": True}),
}


def tiny_lm(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(TINY).eval()


def tokens(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize(handle: adapters.Adapters, seed: int = 3) -> None:
    """Give every adapter tensor random values (B is zero at init, which hides most mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_available_lists_every_method():
    assert set(adapters.available()) == set(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_apply_starts_at_the_base_model_and_trains_only_adapters(method):
    targets, cfg = METHODS[method]
    model = tiny_lm()
    x = tokens()
    base_logits, _ = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = adapters.apply(model, method, targets=targets, **cfg)
    logits, _ = model(x)
    torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-6)  # B = 0: the base model's output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert handle.num_trainable() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        logits, ctx = model(x)
        (logits.logsumexp(-1).mean() + ctx.total_loss()).backward()
        opt.step()
        opt.zero_grad()
    after = {n.replace(".base.", "."): v for n, v in model.state_dict().items() if ".adapter." not in n}
    for name, value in before.items():
        assert torch.equal(after[name], value), f"base weight {name} changed"
    model.eval()
    assert not torch.allclose(model(x)[0], base_logits)  # the adapters did learn something


def test_lora_matches_peft_outputs_and_gradients():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 7))
    ours = copy.deepcopy(net)
    theirs = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0", "2"],
                                                                     lora_dropout=0.0))
    handle = adapters.apply(ours, "lora", targets=["0", "2"], rank=4, alpha=12.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("0", "2"):
            peft_layer = theirs.base_model.model.get_submodule(name)
            A, B = torch.randn(peft_layer.lora_A["default"].weight.shape, generator=g), \
                torch.randn(peft_layer.lora_B["default"].weight.shape, generator=g)
            peft_layer.lora_A["default"].weight.copy_(A)
            peft_layer.lora_B["default"].weight.copy_(B)
            handle.wrappers[name].adapter.lora_A.copy_(A)
            handle.wrappers[name].adapter.lora_B.copy_(B)
    x = torch.randn(5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ours, y_peft = ours(x), theirs(x2)
    torch.testing.assert_close(y_ours, y_peft)
    y_ours.square().sum().backward()
    y_peft.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for name in ("0", "2"):
        peft_layer = theirs.base_model.model.get_submodule(name)
        ad = handle.wrappers[name].adapter
        torch.testing.assert_close(ad.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(ad.lora_B.grad, peft_layer.lora_B["default"].weight.grad)


def test_save_load_round_trip_holds_only_adapter_tensors(tmp_path):
    model = tiny_lm()
    handle = adapters.apply(model, "mixlora", targets=["ffn"], num_experts=4, top_k=2, rank=4)
    randomize(handle)
    x = tokens()
    expected, _ = model(x)
    path = handle.save(tmp_path / "a.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))
    header = adapters.read_header(path)
    assert header["method"] == "mixlora" and header["config"]["num_experts"] == 4
    assert set(adapters.state_dict(model)) == set(handle.state_dict())
    assert all(".base." not in k and ("lora_" in k or "router" in k) for k in handle.state_dict())
    fresh = tiny_lm()  # same base weights, no adapters yet: load applies the file's method, config and targets
    adapters.load(fresh, path)
    torch.testing.assert_close(fresh(x)[0], expected)


def test_merge_folds_lora_into_the_base_weights():
    model = tiny_lm()
    handle = adapters.apply(model, "lora", rank=4)
    randomize(handle)
    x = tokens()
    adapted, _ = model(x)
    base_qkv = handle.wrappers["layers.0.attn.w_qkv"].base.weight.clone()
    merged = adapters.merge(model)
    assert isinstance(merged.layers[0].attn.w_qkv, nn.Linear)
    assert not torch.equal(merged.layers[0].attn.w_qkv.weight, base_qkv)
    torch.testing.assert_close(merged(x)[0], adapted, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())  # the original flags are restored
    with pytest.raises(adapters.AdapterError, match="no adapters"):
        adapters.save(merged, "x.safetensors")


def test_mhr_mu_conversion_merges_and_equals_uniform_routing():
    model = tiny_lm()
    handle = adapters.apply(model, "mhr", num_skills=3, rank=4, num_heads=2)
    randomize(handle)
    with torch.no_grad():
        for w in handle.wrappers.values():
            w.adapter.logits.zero_()  # uniform Z
    x = tokens()
    uniform, _ = model(x)
    adapters.convert(model, "mhr_mu")
    torch.testing.assert_close(model(x)[0], uniform, rtol=1e-5, atol=1e-5)
    merged = adapters.merge(model)
    torch.testing.assert_close(merged(x)[0], uniform, rtol=1e-4, atol=1e-5)


def test_mhr_z_trains_only_routing_logits():
    model = tiny_lm()
    handle = adapters.apply(model, "poly", num_skills=3, rank=4)
    adapters.convert(model, "mhr_z")
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"logits"} and handle.method == "mhr_z"


def test_routed_adapters_report_losses_and_stats_in_the_routing_context():
    model = tiny_lm()
    adapters.apply(model, "mixlora", targets=["ffn"], num_experts=4, top_k=2, rank=4, aux_loss_coef=0.01)
    model.train()
    ctx = RoutingContext(collect_stats=True)
    _, out_ctx = model(tokens(), ctx)
    assert out_ctx is ctx and "aux_loss" in ctx.losses
    assert set(ctx.stats) == {"layers.0.ffn", "layers.1.ffn"}
    summary = ctx.stats_summary()["layers.0.ffn"]
    assert summary["tokens"] == 2 * 12 * 2 and {"load_cv", "dead_experts", "token_entropy"} <= set(summary)
    # linear adapters get the model's context through the pre-hook
    model = tiny_lm()
    adapters.apply(model, "lora_mixer", targets=["w_qkv"], num_experts=4, top_k=2, rank=4)
    ctx = RoutingContext(collect_stats=True)
    model(tokens(), ctx)
    assert set(ctx.stats) == {"layers.0.attn.w_qkv", "layers.1.attn.w_qkv"} and "rsl_balance_loss" in ctx.losses
    # without a context the model creates one, and the adapters' losses land in the one it returns
    _, made = model(tokens())
    assert "rsl_balance_loss" in made.losses


def test_transformers_model_generates_and_backpropagates_with_adapters():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    base_out = model.generate(ids, max_new_tokens=4, do_sample=False)
    handle = adapters.apply(model, "mixlora", targets=["mlp"], num_experts=4, top_k=2, rank=4)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), base_out)
    randomize(handle)
    model.train()
    out = model(input_ids=ids, labels=ids)
    (out.loss + handle.context.total_loss()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapter." in n for n in grads)
    assert "aux_loss" in handle.context.losses


# ---- bad input: one clear error each, nothing changed --------------------------------------------------------


def _unchanged(model: nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("call, message", [
    (lambda m: adapters.apply(m, "lora", targets=["nothing_here"]), "match no nn.Linear"),
    (lambda m: adapters.apply(m, "lora", rank=40), "lora.rank=40 exceeds the smallest dimension"),
    (lambda m: adapters.apply(m, "mixlora", targets=["ffn"], rank=33), "mixlora.rank=33 exceeds"),
    (lambda m: adapters.apply(m, "loraa"), "unknown adapter method 'loraa'"),
    (lambda m: adapters.apply(m, "lora", rnak=4), "did you mean 'lora.rank'"),
    (lambda m: adapters.apply(m, "mixlora", targets=["w_qkv"]), "match no feed-forward"),
    (lambda m: adapters.apply(m, "mhr", num_heads=5), "mhr.num_heads=5 must divide"),
    (lambda m: adapters.merge(adapters.apply(m, "flylora", rank=8, top_k=2)), "cannot be folded"),
])
def test_bad_input_raises_a_clear_error_and_leaves_the_model_alone(call, message):
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(model)
    base = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapter." not in k}
    assert set(base) == set(before) and all(torch.equal(base[k], v) for k, v in before.items())


def test_loading_a_file_of_another_model_or_method_is_refused(tmp_path):
    model = tiny_lm()
    adapters.apply(model, "lora", rank=4)
    path = adapters.save(model, tmp_path / "lora.safetensors")
    other = LanguageModel(ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=2, context=16, moe=None,
                                      dense_hidden_dim=48))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="shape .* belongs to another model"):
        adapters.load(other, path)
    assert _unchanged(other, before) and not hasattr(other, "_moekit_adapters")
    with pytest.raises(ValueError, match="holds 'lora' adapters, not 'mixlora'"):
        adapters.load(tiny_lm(), path, method="mixlora")
    fly = tiny_lm()
    adapters.apply(fly, "flylora", rank=8, top_k=2)
    with pytest.raises(ValueError, match="but the model has flylora adapters"):
        adapters.load(fly, path)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a moekit adapter file"):
        adapters.load(tiny_lm(), plain)
    with pytest.raises(ValueError, match="does not exist"):
        adapters.load(tiny_lm(), tmp_path / "missing.safetensors")


def test_applying_twice_is_refused():
    model = tiny_lm()
    adapters.apply(model, "lora", rank=2)
    with pytest.raises(ValueError, match="already has lora adapters"):
        adapters.apply(model, "lora", rank=2)


def test_mos_shares_pools_across_layers_and_merges(tmp_path):
    model = tiny_lm()
    handle = adapters.apply(model, "mos", targets=["w_qkv"], rank=4)
    pools = {id(w.adapter.pool) for w in handle.wrappers.values()}
    assert len(pools) == 1  # both layers' w_qkv draw from one public pool
    randomize(handle)
    x = tokens()
    adapted, _ = model(x)
    state = handle.state_dict()
    assert sum(k.endswith("pool.pool_A") for k in state) == 1  # shared once in the adapter file
    assert handle.num_trainable() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    path = handle.save(tmp_path / "mos.safetensors")
    fresh = tiny_lm()
    adapters.load(fresh, path)
    torch.testing.assert_close(fresh(x)[0], adapted)
    merged = adapters.merge(model)
    torch.testing.assert_close(merged(x)[0], adapted, rtol=1e-5, atol=1e-5)


def test_mixlora_with_a_companion_lora_on_attention_saves_loads_and_merges(tmp_path):
    """MixLoRA on the FFNs plus plain LoRA on the attention projections (spec §15) in one model: both train, the
    file holds both groups, load rebuilds both, and merge(method='lora') folds only the companion."""
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    adapters.apply(model, "mixlora", targets=["ffn"], num_experts=2, top_k=1, rank=2)
    handle = adapters.apply(model, "lora", targets=["w_qkv", "w_out"], rank=2)
    assert handle is adapters.adapters_of(model) and handle.method == "mixlora+lora"
    assert [g.method for g in handle.groups] == ["mixlora", "lora"] and len(handle.names) == 6
    randomize(handle)
    # each group changes the output: removing either one's update moves it
    full, _ = model(x)
    lora_B = [w.adapter.lora_B for w in handle.groups[1].wrappers.values()]
    saved_B = [b.detach().clone() for b in lora_B]
    with torch.no_grad():
        for b in lora_B:
            b.zero_()
    without_lora, _ = model(x)
    with torch.no_grad():
        for b, s in zip(lora_B, saved_B, strict=True):
            b.copy_(s)
    assert (full - without_lora).abs().max() > 1e-4
    # gradients reach both groups, and nothing else trains
    logits, ctx = model(x, RoutingContext())
    (logits.square().mean() + ctx.total_loss()).backward()
    for g in handle.groups:
        grads = [p.grad for w in g.wrappers.values() for p in w.adapter.parameters() if p.requires_grad]
        assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads), g.method
    trainable = {id(p) for p in handle.parameters()}
    assert all(id(p) in trainable for p in model.parameters() if p.requires_grad)
    # one file, both groups; a fresh model reads it back to the same outputs
    path = adapters.save(model, tmp_path / "both.safetensors")
    header = adapters.read_header(path)
    assert header["method"] == "mixlora+lora" and [g["method"] for g in header["groups"]] == ["mixlora", "lora"]
    fresh = tiny_lm()
    loaded = adapters.load(fresh, path)
    assert loaded.method == "mixlora+lora"
    torch.testing.assert_close(fresh(x)[0], full)
    with pytest.raises(ValueError, match="holds 'mixlora\\+lora' adapters, not 'rank1'"):
        adapters.load(tiny_lm(), path, method="rank1")
    # a module already adapted is refused, by either method
    with pytest.raises(ValueError, match="already has lora adapters"):
        adapters.apply(model, "dynmole", targets=["w_qkv"])
    with pytest.raises(ValueError, match="already has mixlora adapters"):
        adapters.apply(model, "mixlora", targets=["ffn"])
    # merging everything is refused (MixLoRA routes); merging the companion folds it and keeps MixLoRA
    with pytest.raises(ValueError, match="cannot be folded.*method=..."):
        adapters.merge(model)
    adapters.merge(model, method="lora")
    assert handle.method == "mixlora" and isinstance(model.layers[0].attn.w_qkv, nn.Linear)
    assert not torch.equal(model.layers[0].attn.w_qkv.weight, before["layers.0.attn.w_qkv.weight"])
    torch.testing.assert_close(model(x)[0], full, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n)
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_a_one_method_file_without_groups_still_loads(tmp_path):
    """Files written before several methods per model existed have no ``groups`` header field."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    model = tiny_lm()
    handle = adapters.apply(model, "lora", rank=2)
    randomize(handle)
    x = tokens()
    want, _ = model(x)
    header = {k: v for k, v in handle.header().items() if k != "groups"}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in handle.state_dict().items()}, str(path), metadata=header)
    with safe_open(str(path), framework="pt") as f:
        assert "groups" not in f.metadata()
    read = adapters.read_header(path)
    assert [g["method"] for g in read["groups"]] == ["lora"]
    fresh = tiny_lm()
    adapters.load(fresh, path)
    torch.testing.assert_close(fresh(x)[0], want)
