"""Contracts of the layer variants and attention modules that the mutation run found unchecked: config errors
name the field, the value and what is allowed; rotary positions are rotations that depend on relative position
only; initial scales follow their formulas; documented defaults hold."""

from __future__ import annotations

import pytest
import torch

from moekit import FeedForward, MoE, MoEConfig, Routing, RoutingContext
from moekit.configs import ConfigError
from moekit.layers import build_ffn
from moekit.layers.moe import routing_stats
from moekit.layers.attention.rope import apply_rope, rope_tables
from moekit.layers.attention.smha import SelectiveMultiHeadAttention, SMHAConfig
from moekit.layers.attention.switchhead import SwitchHead, SwitchHeadConfig
from moekit.layers.variants.coe import ChainOfExperts, CoEConfig
from moekit.layers.variants.drllm import DrLLMConfig
from moekit.layers.variants.mod import MixtureOfDepths, MoDConfig
from moekit.layers.variants.moepp import MoEPPConfig
from moekit.layers.variants.mor import MoRConfig
from moekit.layers.variants.mumoe import MultilinearMoE, MuMoEConfig, TRMultilinear
from moekit.layers.variants.rmoe import RMoEConfig
from moekit.layers.variants.supernet import SupernetConfig
from moekit.layers.variants.uoe import UoMEConfig
from moekit.routing import RouterConfig

BAD_CONFIGS = [
    (SwitchHeadConfig, {"gate": "sigmod"}, r"attention_options\.gate='sigmod' is not one of \['sigmoid', 'ones'\]"),
    (SwitchHeadConfig, {"num_experts": 0}, r"attention_options\.num_experts=0 must be a positive integer"),
    (RMoEConfig, {"aux_scope": "x"}, r"variant\.aux_scope='x' is not one of \['concat', 'layer'\]"),
    (MoDConfig, {"eval_mode": "x"}, r"variant\.eval_mode='x' is not one of \['topk', 'threshold'\]"),
    (UoMEConfig, {"level": "x"}, r"variant\.level='x' is not one of \['token', 'sequence'\]"),
    (MuMoEConfig, {"gate": "x"}, r"variant\.gate='x' is not one of \['entmax15', 'softmax'\]"),
    (MoRConfig, {"temperature": 0.0}, r"variant\.temperature must be > 0, aux_coef and balance_coef >= 0"),
    (MoEPPConfig, {"num_zero": 0, "num_copy": 0, "num_constant": 0}, r"at least one zero-computation expert; "
                                                                        r"raise variant\.num_zero"),
    (DrLLMConfig, {"focal_gamma": -1.0}, r"focal_gamma=-1\.0 must be >= 0"),
    (DrLLMConfig, {"hidden": 0}, r"hidden=0 must be a positive integer"),
    (SupernetConfig, {"widths": ()}, r"variant\.widths=\(\) must be fractions in \(0, 1\]"),
]


# ids without spaces or regex text: mutmut passes test ids on the command line
@pytest.mark.parametrize("cls,kwargs,message", BAD_CONFIGS,
                         ids=[f"{cls.__name__}-{'-'.join(kwargs)}" for cls, kwargs, _ in BAD_CONFIGS])
def test_bad_variant_configs_name_the_field_value_and_allowed_values(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    (DrLLMConfig, {"focal_gamma": 0.5, "hidden": 1, "num_windows": 1, "max_paths": 1}),  # boundary values
    (SupernetConfig, {"widths": (1.0,)}),  # one width: the dense FFN only
    (RMoEConfig, {"aux_scope": "layer"}),
    (MoDConfig, {"eval_mode": "threshold"}),
    (UoMEConfig, {"level": "sequence"}),
    (SwitchHeadConfig, {"num_experts": 1, "top_k": 1, "gate": "ones"}),
])
def test_boundary_variant_configs_are_accepted(cls, kwargs):
    config = cls(**kwargs)
    assert all(getattr(config, k) == v for k, v in kwargs.items())


def test_unknown_ffn_kind_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown feed-forward kind 'moee'; did you mean 'moe'\?; available: \["):
        build_ffn("moee", MoEConfig(dim=8, hidden_dim=8, num_experts=4, top_k=2))


def test_rope_is_a_rotation_whose_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    S, Dh = 12, 8
    cos, sin = rope_tables(S, Dh, 10_000.0)
    q, k = torch.randn(Dh), torch.randn(Dh)
    q_S = apply_rope(q.expand(1, 1, S, Dh), cos, sin)[0, 0]
    k_S = apply_rope(k.expand(1, 1, S, Dh), cos, sin)[0, 0]
    torch.testing.assert_close(q_S.norm(dim=-1), q.norm().expand(S))  # a rotation keeps the norm
    torch.testing.assert_close(q_S[0], q)  # position 0 is the identity
    scores_SS = q_S @ k_S.T
    for shift in (1, 4):  # (m, n) and (m + shift, n + shift) score alike
        torch.testing.assert_close(scores_SS[shift:, shift:], scores_SS[:-shift, :-shift], rtol=1e-5, atol=1e-5)
    # the first pair at position 1 is rotated by exactly one radian (theta^0)
    expected = torch.tensor([q[0] * torch.cos(torch.tensor(1.0)) - q[1] * torch.sin(torch.tensor(1.0)),
                             q[0] * torch.sin(torch.tensor(1.0)) + q[1] * torch.cos(torch.tensor(1.0))])
    torch.testing.assert_close(q_S[1, :2], expected)


def test_smha_uses_half_the_heads_by_default():
    assert SelectiveMultiHeadAttention(16, 4, 2).top_k == 2
    assert SelectiveMultiHeadAttention(16, 1, 2).top_k == 1
    assert SelectiveMultiHeadAttention(16, 4, 2, SMHAConfig(heads_per_token=3)).top_k == 3


def test_switchhead_output_projection_has_the_gpt2_residual_scale():
    torch.manual_seed(0)
    dim, heads, layers, k = 32, 4, 3, 2
    layer = SwitchHead(dim, heads, layers, SwitchHeadConfig(num_experts=4, top_k=k))
    H, E, Dh, _ = layer.w_o_HEDhD.shape
    expected = (H * Dh * k) ** -0.5 / (2 * layers) ** 0.5
    assert abs(layer.w_o_HEDhD.std().item() / expected - 1) < 0.1


def test_tensor_ring_factor_init_is_bounded_by_the_fan_in():
    torch.manual_seed(0)
    in_dim = 9
    layer = TRMultilinear(4, in_dim, 5, 2, 3, 2)
    bound = in_dim ** -0.5
    assert layer.g_in.abs().max() <= bound and layer.g_in.abs().max() > 0.5 * bound


def test_mumoe_second_level_gate_uses_the_configured_norm():
    no_loss = RouterConfig(aux_loss_coef=0.0, z_loss_coef=0.0)
    moe = MoEConfig(dim=8, hidden_dim=8, num_experts=5, top_k=2, router=no_loss)
    layer = MultilinearMoE(moe, MuMoEConfig(hierarchy_experts=3, gate_norm="layernorm")).train()
    assert isinstance(layer.gate_norm2, torch.nn.LayerNorm)
    y = layer(torch.randn(1, 1, 8))  # one token in training: a batch norm could not normalise it
    assert torch.isfinite(y).all()
    assert isinstance(MultilinearMoE(moe, MuMoEConfig(hierarchy_experts=3, gate_norm="batchnorm")).gate_norm2,
                      torch.nn.BatchNorm1d)


# ---------------------------------------------------------------- moekit/layers/moe.py survivors


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_shared_expert_uses_the_layers_activation(activation):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=6, hidden_dim=5, num_experts=3, top_k=1, num_shared_experts=1, activation=activation))
    shared = moe.shared_experts
    x = torch.randn(4, 6)
    act = torch.nn.functional.gelu if activation == "gelu" else torch.relu
    torch.testing.assert_close(shared(x), act(x @ shared.w_up.T) @ shared.w_down.T)


@pytest.mark.parametrize("E", [2, 3, 5])
def test_token_entropy_is_normalised_to_one_for_uniform_scores(E):
    routing = Routing(expert_ids_TK=torch.zeros(4, 1, dtype=torch.long), weights_TK=torch.ones(4, 1),
                      scores_TE=torch.full((4, E), 1.0 / E), logits_TE=torch.zeros(4, E))
    torch.testing.assert_close(routing_stats(routing).token_entropy, torch.tensor(1.0))


def test_moe_layer_default_name_keys_its_statistics_and_losses():
    moe = MoE(MoEConfig(dim=6, hidden_dim=5, num_experts=3, top_k=2))
    assert moe.name == "moe"
    ctx = RoutingContext(collect_stats=True)
    moe(torch.randn(5, 6), ctx)
    assert list(ctx.stats) == ["moe"]
    assert ctx.losses and list(ctx.layer_losses) == ["moe"]  # the default aux loss is kept under the name


def test_moe_repr_names_its_shape():
    text = repr(MoE(MoEConfig(dim=6, hidden_dim=5, num_experts=3, top_k=2, num_shared_experts=1)))
    assert "dim=6, hidden_dim=5, num_experts=3, top_k=2, shared=1, engine=" in text


def test_mod_threshold_eval_reports_the_fraction_under_the_layer_name():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16)
    mod = MixtureOfDepths(8, MoDConfig(eval_mode="threshold"), name="l3").eval()
    x = torch.randn(2, 6, 8)
    ctx = RoutingContext(collect_stats=True)
    with torch.no_grad():
        mod(x, lambda h, ctx=None: ffn(h), ctx)
        expected = (torch.nn.functional.linear(x, mod.router.weight)[..., 0].sigmoid() > 0.5).float().mean()
    assert list(ctx.stats) == ["l3"]
    torch.testing.assert_close(ctx.stats["l3"].extra["fraction_processed"], expected)


def test_chain_of_experts_active_params_count_each_iteration():
    D, F_, E, k = 8, 6, 4, 2
    cfg = MoEConfig(dim=D, hidden_dim=F_, num_experts=E, top_k=k, num_shared_experts=1)
    for C in (1, 2, 3):
        coe = ChainOfExperts(cfg, CoEConfig(num_iterations=C))
        router = sum(p.numel() for p in coe.routers[0].parameters())
        assert router >= D * E
        assert coe.active_params() == C * (router + k * 3 * D * F_ + 3 * D * F_)  # SwiGLU: 3 D F per expert
