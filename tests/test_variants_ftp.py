"""FTP (compression-adaptation-serving.md §40): the spec's minimal faithful tests, the router's features, its
three losses through the training-step hook, and the frozen LLM."""

from __future__ import annotations

import pytest
import torch

from moekit import RoutingContext
from moekit.configs import ConfigError
from moekit.layers.step_hook import training_step_hook
from moekit.layers.variants.ftp import (
    FTPConfig,
    TokenPruner,
    attention_received,
    router_features,
    static_keep,
)
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.training import with_overrides

from .reference import assert_close

SMALL = {"model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "3",
         "model.dense_hidden_dim": "32"}


def _pair(**extra):
    cfg = with_overrides(load_preset("ftp"), {**SMALL, **extra})
    torch.manual_seed(0)
    pruned = LanguageModel(cfg.model)
    base = LanguageModel(cfg.model.replace(depth_routing={}))
    base.load_state_dict({k: v for k, v in pruned.state_dict().items() if not k.startswith("depth_router.")})
    return pruned, base


def test_zero_sparsity_is_the_dense_model_exactly():
    pruned, base = _pair(**{"model.depth_routing.sparsity": "0.0"})
    x = torch.randint(0, 256, (2, 8))
    for mode in (True, False):
        pruned.train(mode), base.train(mode)
        # equal up to float rounding: the pruned model's attention is an explicit softmax (it publishes it)
        assert_close(pruned(x)[0], base(x)[0], "sparsity 0", atol=1e-6, rtol=1e-5)


def test_a_skipped_token_is_unchanged_across_the_block_and_the_static_ratio_is_met():
    torch.manual_seed(1)
    pruner = TokenPruner(2, FTPConfig(sparsity=(0.25, 0.5), router="static")).eval()
    lin = torch.nn.Linear(4, 4)
    seen = []

    def delta(h, ctx, i):
        seen.append(h.clone())
        probs = torch.rand(2, 1, 8, 8).tril()
        ctx.state["attention.probs"] = probs / probs.sum(-1, keepdim=True)
        return lin(h)

    x = torch.randn(2, 8, 4)
    ctx = RoutingContext(collect_stats=True)
    out = pruner(x, [lambda h, c: delta(h, c, 0), lambda h, c: delta(h, c, 1)], ctx)
    after_first = seen[1]
    static = ctx.state["ftp.static"]
    skipped0 = static[0] == 0
    assert torch.equal(after_first[skipped0], x[skipped0]), "skipped tokens pass block 0 unchanged"
    assert not torch.equal(after_first[~skipped0], x[~skipped0])
    skipped1 = static[1] == 0
    assert torch.equal(out[skipped1], after_first[skipped1])
    summary = ctx.stats_summary()["ftp"]
    assert summary["skip_ratio_0"] == pytest.approx(0.25) and summary["skip_ratio_1"] == pytest.approx(0.5)


def test_router_reads_exactly_four_features():
    score = torch.tensor([[0.1, 0.5, 0.2, 0.9]])
    f = router_features(score, 0.3)
    assert f.shape == (1, 4, 4)
    assert_close(f[0, :, 0], torch.tensor([0, 1 / 3, 2 / 3, 1.0]), "position")
    assert_close(f[0, :, 2], torch.tensor([3, 1, 2, 0]) / 3.0, "rank, 0 = most attended")
    assert torch.equal(f[0, :, 3], torch.full((4,), 0.3))
    pruner = TokenPruner(3)
    assert all(r[0].in_features == 4 for r in pruner.routers)
    assert static_keep(score, 0.5).tolist() == [[0.0, 1.0, 0.0, 1.0]], "skip the least attended half"


def test_attention_received_averages_over_heads_and_visible_queries():
    probs = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    both = torch.stack([probs, probs])[None]  # [1, H=2, 3, 3]
    assert_close(attention_received(both, 1, 3, "cpu"), torch.tensor([[1.7 / 3, 0.8 / 2, 0.5]]), "received")
    assert torch.equal(attention_received(None, 2, 3, "cpu"), torch.zeros(2, 3))


def test_training_step_losses_coefficients_and_a_frozen_llm():
    values = {}
    for coef in ("1.0", "2.0"):
        pruned, _ = _pair(**{"model.depth_routing.guide_coef": coef})
        pruned.train()
        step = training_step_hook(pruned)
        assert step.func is TokenPruner.training_step
        x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
        values[coef] = (pruned, step(lambda ctx, m=pruned, x=x: m(x, ctx), y, True))
    pruned, out = values["1.0"]
    assert set(out.ctx.losses) == {"ftp_guide_loss", "ftp_sparsity_loss", "ftp_distill_loss"}
    assert_close(values["2.0"][1].ctx.losses["ftp_guide_loss"], 2 * out.ctx.losses["ftp_guide_loss"], "coef")
    assert out.ctx.losses["ftp_distill_loss"] > 0, "soft skipping moves the routed pass off the dense one"
    pruned.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n for n, p in pruned.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(n.startswith("layers.") for n in grads), "the blocks get no gradient (detached updates)"
    assert any(n.startswith("depth_router.routers.0.") for n in grads)
    assert {id(p) for p in out.trainable} == {id(p) for p in pruned.depth_router.parameters()}


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="sparsity has 2 values but the model has 3 blocks"):
        with_overrides(load_preset("ftp"), {**SMALL, "model.depth_routing.sparsity": "0.1,0.2"})
    with pytest.raises(ConfigError, match=r"model.depth_routing.sparsity=1.5 must be in \[0, 1\)"):
        FTPConfig(sparsity=1.5)
    with pytest.raises(ConfigError, match="does not publish"):
        LanguageModel(with_overrides(load_preset("ftp"), {**SMALL, "model.attention": "mom"}).model)


def test_the_trainer_updates_only_the_routers(tmp_path):
    from moekit.data import load_data
    from moekit.training import train_step
    from moekit.training.optim import build_optimizer

    cfg = with_overrides(load_preset("ftp"), {**SMALL, "train.batch_size": "2", "data.max_files": "3",
                                              "train.grad_accum": "2"})
    model = LanguageModel(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = train_step(model, build_optimizer(model, cfg.train), load_data(cfg.data), cfg, 0,
                         torch.device("cpu"), collect_stats=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("depth_router.") for n in changed), sorted(changed)[:5]
    assert metrics["aux"] > 0
