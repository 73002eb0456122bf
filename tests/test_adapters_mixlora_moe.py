"""MixLoRA on a MoE base (spec §15 defines it over a frozen *dense* feed-forward): the routed experts of a MoE
layer are refused with one line naming what works; the dense feed-forwards of a MoE model (shared experts, dense
layers) take MixLoRA like any dense FFN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import adapters
from moekit.cli.main import main
from moekit.layers.moe import MoEConfig
from moekit.models import LanguageModel, ModelConfig
from moekit.types import RoutingContext

from .test_adapters_finetune import fails_with


def moe_lm(shared: int = 1, first_dense: int = 0) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(dim=16, num_layers=2, num_heads=2, context=8, first_dense_layers=first_dense,
                                     moe=MoEConfig(dim=16, num_experts=4, top_k=2, hidden_dim=16,
                                                   num_shared_experts=shared))).eval()


@pytest.mark.parametrize("shared", [0, 1])
def test_mixlora_on_routed_experts_is_refused_naming_what_works(shared):
    model = moe_lm(shared)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        adapters.apply(model, "mixlora")
    msg = str(info.value)
    assert "match MoE layers ['layers.0.ffn', 'layers.1.ffn']" in msg and "not defined over routed experts" in msg
    assert "lora_mixer" in msg and "targets w_qkv,w_out" in msg
    assert ("targets=['shared_experts']" in msg) == bool(shared)
    assert not any(isinstance(m, adapters.AdaptedFFN) for m in model.modules())
    for k, v in model.state_dict().items():  # nothing touched
        assert torch.equal(v, before[k]), k


def test_mixlora_on_the_shared_experts_of_a_moe_model():
    model = moe_lm(shared=1)
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        base_out = model(tokens)[0]
    handle = adapters.apply(model, "mixlora", ["shared_experts"], num_experts=3, top_k=2, rank=2)
    assert handle.names == ["layers.0.ffn.shared_experts", "layers.1.ffn.shared_experts"]
    with torch.no_grad():  # B = 0: the adapted model is the base model for any routing
        torch.testing.assert_close(model(tokens)[0], base_out)
    model.train()
    logits, ctx = model(tokens, RoutingContext(collect_stats=True))
    assert "layers.0.ffn.shared_experts" in ctx.stats_summary(), "the adapter's routing is recorded"
    assert "aux_loss" in ctx.layer_losses["layers.1.ffn.shared_experts"], "its balancing loss reaches the context"
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + ctx.total_loss()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".adapter." in n for n in with_grad), with_grad
    assert any("adapter.router" in n for n in with_grad) and any(n.endswith("lora_B") for n in with_grad)  # A: 0 grad while B = 0


def test_mixlora_on_a_moe_model_with_a_dense_layer_adapts_only_the_dense_ffn():
    model = moe_lm(shared=0, first_dense=1)
    handle = adapters.apply(model, "mixlora", num_experts=2, rank=2)
    assert handle.names == ["layers.0.ffn"]


def test_finetune_mixlora_on_a_moe_run_is_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--preset", "default", "--out", str(base), "--no-progress", "--train.max_steps=1",
                 "--model.dim=16", "--model.num_layers=1", "--model.num_heads=2", "--model.context=16",
                 "--model.moe.hidden_dim=16", "--model.moe.num_experts=2", "--model.moe.top_k=2",
                 "--data.max_files=4", "--data.max_bytes=30000", "--train.batch_size=2", "--train.eval_every=0", "--train.eval_batches=1",
                 "--train.max_seconds=none", "--train.device=cpu", "--train.threads=1"]) == 0
    capsys.readouterr()
    out = tmp_path / "ft"
    fails_with(capsys, ["finetune", str(base), "--method", "mixlora", "--out", str(out)],
               "not defined over routed experts", "lora_mixer")
    assert not out.exists()
