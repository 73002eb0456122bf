"""The generic training-step hook (moekit.layers.step_hook): lookup, binding, conflicts, and the trainer's use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit.configs import ConfigError
from moekit.experts import FeedForward
from moekit.layers import register_ffn
from moekit.layers.registry import FFN_BUILDERS
from moekit.layers.step_hook import (
    StepLoss,
    language_model_loss,
    next_token_ce,
    training_step_hook,
)
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.training import train_step, with_overrides
from moekit.training.optim import build_optimizer

CALLS: list[tuple[int, bool]] = []


class Hooked(nn.Module):
    """A dense FFN whose step doubles the CE and records how it was called."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = FeedForward(dim, 8)

    def forward(self, x, ctx=None):
        return self.ffn(x)

    @staticmethod
    def training_step(modules, forward, targets_BS, collect_stats):
        CALLS.append((len(modules), collect_stats))
        plain = language_model_loss(forward, targets_BS, collect_stats)
        plain.ctx.add_loss("hooked_loss", plain.ce.detach() * 0 + 1.0)
        return StepLoss(loss=2 * plain.ce, ce=plain.ce, aux=1.0, ctx=plain.ctx)


class Other(Hooked):
    @staticmethod
    def training_step(modules, forward, targets_BS, collect_stats):  # a second, different hook
        raise AssertionError("never called")


@pytest.fixture
def hooked_ffn():
    register_ffn("test_hooked")(lambda moe, options, **kw: Hooked(moe.dim))
    yield
    del FFN_BUILDERS["test_hooked"]


def test_plain_step_is_ce_plus_routing_losses():
    model = LanguageModel(with_overrides(load_preset("default"), {
        "model.dim": "16", "model.num_heads": "2", "model.context": "8", "model.num_layers": "1",
        "model.moe.hidden_dim": "8"}).model)
    assert training_step_hook(model) is language_model_loss
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    out = language_model_loss(lambda ctx: model(x, ctx), y, True)
    torch.testing.assert_close(out.ce, next_token_ce(out.logits_BSV, y))
    assert out.ctx.losses["aux_loss"] > 0, "the MoE's balancing loss is in the step"
    torch.testing.assert_close(out.loss, out.ce + out.ctx.total_loss())
    assert out.ctx.stats, "statistics collected when asked"


def test_hook_binds_every_module_of_its_kind_and_conflicts_are_refused():
    model = nn.Sequential(Hooked(4), nn.Linear(4, 4), Hooked(4))
    hook = training_step_hook(model)
    assert hook.func is Hooked.training_step and len(hook.args[0]) == 2
    with pytest.raises(ConfigError, match="Hooked, Other"):
        training_step_hook(nn.Sequential(Hooked(4), Other(4)))


def test_trainer_runs_the_variants_hook_once_per_micro_batch(hooked_ffn):
    from moekit.data import load_data

    CALLS.clear()
    cfg = with_overrides(load_preset("default"), {
        "model.ffn": "test_hooked", "model.dim": "16", "model.num_heads": "2", "model.context": "8",
        "model.num_layers": "2", "model.moe.hidden_dim": "8", "train.batch_size": "2", "train.grad_accum": "2",
        "data.max_files": "3"})
    model = LanguageModel(cfg.model)
    metrics = train_step(model, build_optimizer(model, cfg.train), load_data(cfg.data), cfg, 0,
                         torch.device("cpu"), collect_stats=True)
    assert CALLS == [(2, True), (2, True)], "one call per micro-batch, bound to both sparse layers"
    assert metrics["aux"] == 1.0 and metrics["loss"] == pytest.approx(metrics["ce"] + 1.0)
