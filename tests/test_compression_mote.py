"""MoTE (spec §6): ternary STE experts over a frozen full-precision shared FFN, QAT through the trainer."""

import pytest
import torch

from moekit.cli.main import main
from moekit.compression.mote import (
    MoTE,
    act_quant_int8,
    mote_qat,
    ternary_ste,
    upcycle_to_mote,
)
from moekit.experts import FeedForward
from moekit.models import LanguageModel, ModelConfig
from moekit.types import RoutingContext


def layer(seed=0):
    torch.manual_seed(seed)
    return MoTE(FeedForward(12, 20, "swiglu"), 4)


def test_ternary_weights_take_three_values_and_ste_is_identity():
    w = torch.randn(7, 9, requires_grad=True)
    q = ternary_ste(w)
    s = float(w.detach().abs().mean()) + 1e-5
    assert set(torch.round(q.detach() / s).unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(q.detach().abs().unique(), torch.tensor([0.0, s])[: len(q.detach().abs().unique())])
    q.mul(torch.arange(63.0).view(7, 9)).sum().backward()
    assert torch.equal(w.grad, torch.arange(63.0).view(7, 9))
    x = torch.randn(5, 9, requires_grad=True)
    act_quant_int8(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 9))


def test_zeroed_experts_give_the_dense_model_and_shared_ffn_gets_no_gradient():
    m = layer()
    dense = FeedForward(12, 20, "swiglu")
    dense.load_state_dict(m.shared.state_dict())
    x = torch.randn(2, 6, 12)
    with torch.no_grad():
        for p in (m.experts.w_gate, m.experts.w_up, m.experts.w_down):
            p.zero_()
    assert torch.allclose(m(x), dense(x), atol=1e-6)
    m2 = layer(1)
    ctx = RoutingContext()
    (m2(x, ctx).square().sum() + ctx.total_loss()).backward()
    assert all(p.grad is None for p in m2.shared.parameters())
    assert m2.router.weight.grad is not None and m2.router.weight.grad.abs().sum() > 0
    assert m2.experts.w_up.grad.abs().sum() > 0
    assert "aux_loss" in ctx.losses


def test_exactly_one_routed_expert_per_token():
    m = layer()
    routing = m.router(torch.randn(30, 12))
    assert routing.expert_ids_TK.shape == (30, 1) and (routing.expert_ids_TK >= 0).all()


def test_upcycle_freezes_all_but_routers_and_experts():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=8))
    upcycle_to_mote(model, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ffn.router." in n or ".ffn.experts." in n for n in trainable)
    logits, ctx = model(torch.randint(0, 40, (2, 8)))
    assert torch.isfinite(logits).all() and "aux_loss" in ctx.losses


@pytest.mark.slow
def test_mote_qat_through_the_trainer_lowers_the_loss(tmp_path):
    run = tmp_path / "dense"
    assert main(["train", "--preset", "dense", "--out", str(run), "--no-progress", "--train.max_steps=30",
                 "--train.eval_every=0", "--model.dim=32", "--model.num_layers=2", "--model.num_heads=2",
                 "--model.context=32", "--model.dense_hidden_dim=64", "--data.max_files=8",
                 "--train.batch_size=4", "--train.lr=1e-2"]) == 0
    from moekit.data import load_data
    from moekit.training import load_run
    from moekit.training.evaluate import evaluate
    cfg, start, _ = load_run(run, "cpu")
    data = load_data(cfg.data)

    def val(m):  # fixed validation batches: the per-step training loss is too noisy at this size
        return evaluate(m, data, batch_size=8, num_batches=4)["val_loss"]
    torch.manual_seed(0)
    before = val(upcycle_to_mote(start, 4))
    torch.manual_seed(0)
    model, history = mote_qat(run, num_experts=4, steps=30, lr=1e-2)
    assert all(isinstance(b.ffn, MoTE) for b in model.layers) and len(history) == 30
    assert val(model) < before
