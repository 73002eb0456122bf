"""Whole-model loops: SEMA's continual expansion and MoME's multi-scale training on a moekit LM."""

from __future__ import annotations

import pytest
import torch

from moekit import adapters
from moekit.adapters.loops import mome_train, pooled_logits, sema_continual
from moekit.models import LanguageModel, ModelConfig
from moekit.types import RoutingContext

TINY = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=2, context=16, moe=None, dense_hidden_dim=48)


def tiny_lm(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(TINY).eval()


def counting(low: int, span: int, step: int, batch: int = 8, seq: int = 16):
    """Sequences ``low + (start + step * i) mod span``: a learnable task over its own range of token ids."""
    def sample(g: torch.Generator):
        start_B1 = torch.randint(0, span, (batch, 1), generator=g)
        ids = low + (start_B1 + step * torch.arange(seq + 1)) % span
        return ids[:, :-1], ids[:, 1:]
    return sample


@torch.no_grad()
def task_loss(model, sample, seed=99):
    x, y = sample(torch.Generator().manual_seed(seed))
    logits, _ = model(x)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))


def test_sema_continual_expands_on_a_shift_keeps_old_adapters_and_reuses_on_a_known_task():
    model = tiny_lm()
    handle = adapters.apply(model, "sema", ["w_qkv", "w_out"], bottleneck=4, descriptor_dim=8)
    task_a, task_b = counting(0, 32, 1), counting(200, 56, 3)
    first = "layers.0.attn.w_qkv"  # sees only the embeddings: its inputs depend on the task alone
    (stage_a,) = sema_continual(model, [task_a], steps=25, lr=1e-2)
    assert stage_a["expanded"] == [] and stage_a["last_loss"] < stage_a["first_loss"]
    after_a = {k: v.clone() for k, v in handle.state_dict().items()}
    loss_b_before = task_loss(model, task_b)
    stage_b, stage_a2 = sema_continual(model, [task_b, task_a], steps=25, lr=1e-2, seed=1)
    assert first in stage_b["expanded"]  # a new token range: a representation shift
    assert first not in stage_a2["expanded"]  # task A again: its descriptor knows these inputs
    assert stage_b["last_loss"] < stage_b["first_loss"] and task_loss(model, task_b) < loss_b_before
    assert handle.wrappers[first].adapter.num_adapters == 2
    # after B, B's adapters are frozen too: at A again only the adapters added then train
    assert stage_a2["trainable"] < stage_b["trainable"] or not stage_a2["expanded"]
    now = handle.state_dict()
    for key, value in after_a.items():  # every tensor fitted on task A is bit-identical afterwards
        assert torch.equal(now[key], value), key
    with pytest.raises(ValueError, match="trains sema adapters, but the model has lora"):
        sema_continual(adapters.apply(tiny_lm(), "lora", rank=2).model, [task_a], steps=1)


def test_mome_train_pools_embeddings_and_trains_one_router_at_every_rate():
    sample = counting(0, 64, 1)
    x, y = sample(torch.Generator().manual_seed(0))
    model = tiny_lm()
    handle = adapters.apply(model, "mome", ["w_qkv", "w_out"], num_experts=3, top_k=2, rank=2)
    # rate 1 is the plain model; rate r runs on S / r pooled positions
    torch.testing.assert_close(pooled_logits(model, x, 1, RoutingContext()), model(x)[0])
    assert pooled_logits(model, x, 4, RoutingContext()).shape == (8, 4, 256)
    with pytest.raises(ValueError, match="must be >= 1 and divide the sequence length 16"):
        pooled_logits(model, x, 3, RoutingContext())
    # one rate's loss alone already trains the same router that rate 1 uses
    router = handle.wrappers["layers.0.attn.w_qkv"].adapter.router.weight
    logits = pooled_logits(model, x, 2, ctx := RoutingContext())
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1::2].flatten()) + ctx.total_loss()).backward()
    assert router.grad is not None and router.grad.abs().sum() > 0
    router.grad = None
    records = mome_train(model, sample, rates=(1, 2), steps=30, lr=1e-2)
    assert records[-1]["loss_r1"] < records[0]["loss_r1"] and records[-1]["loss_r2"] < records[0]["loss_r2"]
    # trained at rate 1 only, the rate-2 loss ends higher: the multi-scale term is what teaches the coarse scale
    single = tiny_lm()
    adapters.apply(single, "mome", ["w_qkv", "w_out"], num_experts=3, top_k=2, rank=2)
    mome_train(single, sample, rates=(1,), steps=30, lr=1e-2)
    with torch.no_grad():
        coarse = [torch.nn.functional.cross_entropy(pooled_logits(m, x, 2, RoutingContext()).flatten(0, 1),
                                                    y[:, 1::2].flatten()).item() for m in (model, single)]
    assert coarse[0] < coarse[1]
