"""Mixture-of-Recursions (architectures.md §9): token-choice routing, the capacity warm-up and recursion-wise KV
sharing, each against a readable reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import FeedForward, RoutingContext
from moekit.configs import ConfigError
from moekit.layers.variants.mor import KV_SHARE_KEY, POSITIONS_KEY, MixtureOfRecursions, MoRConfig
from moekit.models import LanguageModel, ModelConfig
from moekit.models.attention import Attention
from moekit.training.trainer import call_on_step

from .variants_util import params_with_grad


def _mixing_block():
    """A block whose output depends on the other tokens it is given (causal running mean), so running it on the
    wrong subsequence shows."""
    torch.manual_seed(0)
    ffn = FeedForward(8, 16)

    def block(h_BKD, ctx=None):
        mean_BKD = h_BKD.cumsum(1) / torch.arange(1, h_BKD.shape[1] + 1)[:, None]
        return h_BKD + ffn(mean_BKD)
    return ffn, block


def _token_choice_reference(mor, x_BSD, block):
    """Sequence by sequence, step by step: tokens with depth > r run the block on their own subsequence."""
    c, n = mor.config, mor.config.num_recursions
    probs_BSN = (x_BSD @ mor.routers[0].weight.t() / c.temperature).softmax(-1)
    p_BS, choice_BS = probs_BSN.max(-1)
    rows = []
    for b in range(x_BSD.shape[0]):
        h_SD = x_BSD[b]
        for r in range(n):
            idx = [t for t in range(x_BSD.shape[1]) if choice_BS[b, t] + 1 > r]
            if not idx:
                continue
            out_KD = block(h_SD[idx][None])[0]
            h_SD = h_SD.index_add(0, torch.tensor(idx), c.alpha * n * p_BS[b, idx, None] * out_KD)
        rows.append(h_SD)
    return torch.stack(rows), choice_BS + 1


@pytest.mark.parametrize("equal_counts", [False, True])
def test_token_choice_runs_each_token_to_its_depth(equal_counts):
    ffn, block = _mixing_block()
    torch.manual_seed(3)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, routing="token_choice"), name="mor")
    x = torch.randn(2 if not equal_counts else 1, 7, 8, requires_grad=True)
    ctx = RoutingContext(collect_stats=True)
    y = mor(x, block, ctx)
    ref, depth = _token_choice_reference(mor, x, block)
    torch.testing.assert_close(y, ref)
    if not equal_counts:
        assert len(set(depth.sum(1).tolist())) > 1, "the rows must differ to exercise the per-sequence path"
    g = torch.randn_like(y)
    for a, b_ in zip(torch.autograd.grad(y, [x, mor.routers[0].weight], g),
                     torch.autograd.grad(ref, [x, mor.routers[0].weight], g)):
        torch.testing.assert_close(a, b_)
    s = ctx.stats_summary()["mor"]
    assert s["mean_depth"] == pytest.approx(depth.float().mean().item())


def test_token_choice_balancing_loss():
    ffn, block = _mixing_block()
    x = torch.randn(2, 6, 8)
    losses = []
    for coef in (0.01, 0.05):
        torch.manual_seed(0)
        mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, routing="token_choice", balance_coef=coef))
        ctx = RoutingContext()
        mor(x, block, ctx)
        losses.append(ctx.losses["mor_balance_loss"])
    assert losses[1].item() == pytest.approx(5 * losses[0].item(), rel=1e-5)
    assert params_with_grad(torch.nn.ModuleDict({"mor": mor, "ffn": ffn}), losses[1]) == {"mor.routers.0.weight"}
    with torch.no_grad():
        mor.routers[0].weight.zero_()  # a uniform router: the Switch loss is exactly 1
    ctx = RoutingContext()
    mor(x, block, ctx)
    assert ctx.losses["mor_balance_loss"].item() == pytest.approx(0.05)


def test_capacity_warm_up_decays_by_half_cosine_in_training_only():
    ffn, block = _mixing_block()
    # top-k in evaluation too (the causal threshold path has no capacities to compare)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, cap_warmup_steps=10, eval_routing="expert_choice"))
    x = torch.randn(2, 6, 8)

    def sizes(training, step):
        mor.train(training)
        call_on_step(torch.nn.ModuleDict({"m": mor}), step)  # the trainer's hook sets the clock
        seen = []
        mor(x, lambda h, c: seen.append(h.shape[1]) or block(h), RoutingContext())
        return seen

    assert sizes(True, 0) == [6, 6, 6], "the warm-up starts at capacity 1.0"
    # halfway: c + (1 - c) / 2 -> 5/6 and 2/3 of 6 tokens
    assert sizes(True, 5) == [6, 5, 4]
    assert sizes(True, 10) == [6, 4, 2] and sizes(True, 99) == [6, 4, 2]
    assert sizes(False, 0) == [6, 4, 2], "evaluation uses the target capacities"
    w = MoRConfig(num_recursions=3, cap_warmup_steps=8).warmed(2)
    assert w[2] == pytest.approx(1 / 3 + (2 / 3) * (1 + math.cos(math.pi / 4)) / 2)


def _reference_shared_attention(attn, x1_BSD, x2_BKD, pos_BK, cos, sin):
    """Queries of the step-r tokens against the step-1 keys / values, masked by position, by hand."""
    B, S, D = x1_BSD.shape
    H, Dh = attn.num_heads, attn.head_dim
    from moekit.layers.attention import apply_rope
    _, k, v = attn.w_qkv(x1_BSD).view(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
    k = apply_rope(k, cos, sin)
    q = attn.w_qkv(x2_BKD).view(B, -1, 3, H, Dh).permute(2, 0, 3, 1, 4)[0]
    q = apply_rope(q, cos[pos_BK], sin[pos_BK])  # [B, K, R] tables, as the model's depth routing passes them
    out = torch.zeros_like(q)
    for b in range(B):
        for i, p in enumerate(pos_BK[b].tolist()):
            w = (q[b, :, i, None] @ k[b, :, :p + 1].transpose(-1, -2)) / math.sqrt(Dh)  # [H, 1, p + 1]
            out[b, :, i] = (w.softmax(-1) @ v[b, :, :p + 1])[:, 0]
    return attn.w_out(out.transpose(1, 2).reshape(B, -1, D))


def test_shared_kv_attention_reuses_the_first_recursions_keys():
    torch.manual_seed(0)
    attn = Attention(16, 2, 2)
    model = LanguageModel(ModelConfig(dim=16, num_layers=3, num_heads=2, context=8))
    cos, sin = model.rope_cos, model.rope_sin
    x1, x2 = torch.randn(2, 8, 16), torch.randn(2, 3, 16)
    pos = torch.tensor([[0, 4, 7], [2, 3, 5]])
    ctx = RoutingContext()
    ctx.state[KV_SHARE_KEY] = {"reuse": False, "rows": None, "kv": {}}
    plain = attn(x1, cos, sin, None, 1, ctx=ctx)  # the first recursion stores and attends as usual
    torch.testing.assert_close(plain, attn(x1, cos, sin, None, 1))
    ctx.state[KV_SHARE_KEY]["reuse"] = True
    ctx.state[POSITIONS_KEY] = pos
    y = attn(x2, cos[pos], sin[pos], None, 1, ctx=ctx)
    torch.testing.assert_close(y, _reference_shared_attention(attn, x1, x2, pos, cos, sin))
    ctx.state[KV_SHARE_KEY] = None  # without sharing, the step attends among its own tokens only
    assert not torch.allclose(attn(x2, cos[pos], sin[pos], None, 1, ctx=ctx), y)


def _mor_model(**depth):
    cfg = ModelConfig(dim=16, num_layers=4, num_heads=2, context=12,
                      depth_routing={"kind": "mor", "num_recursions": 3, **depth})
    torch.manual_seed(0)
    return LanguageModel(cfg)


def test_kv_sharing_in_the_model():
    tokens = torch.randint(0, 256, (2, 12))
    shared, plain = _mor_model(kv_sharing=True), _mor_model()
    shared.load_state_dict(plain.state_dict())
    y_shared, ctx = shared(tokens)
    assert ctx.state[KV_SHARE_KEY] is None, "the sharing ends with the recursions (the last block attends as usual)"
    assert not torch.allclose(y_shared, plain(tokens)[0], atol=1e-5), "later recursions read the step-1 keys"
    # one recursion has nothing to share: identical to the unshared model
    one_s, one_p = _mor_model(num_recursions=1, kv_sharing=True), _mor_model(num_recursions=1)
    one_s.load_state_dict(one_p.state_dict())
    torch.testing.assert_close(one_s(tokens)[0], one_p(tokens)[0])
    # token choice shares too (sequence by sequence), and the loss reaches every weight
    tc = _mor_model(kv_sharing=True, routing="token_choice")
    tc_plain = _mor_model(routing="token_choice")
    tc_plain.load_state_dict(tc.state_dict())
    y, ctx = tc(tokens)
    assert not torch.allclose(y, tc_plain(tokens)[0], atol=1e-5), "token choice reads the step-1 keys too"
    loss = F.cross_entropy(y.flatten(0, 1), tokens.flatten()) + ctx.total_loss()
    names = params_with_grad(tc, loss)
    assert "depth_router.routers.0.weight" in names and "layers.1.attn.w_qkv.weight" in names


def test_mor_option_errors():
    with pytest.raises(ConfigError, match="variant.routing"):
        MoRConfig(routing="depth_choice")
    with pytest.raises(ConfigError, match="for routing='expert_choice'"):
        MoRConfig(routing="token_choice", cap_warmup_steps=10)
    with pytest.raises(ConfigError, match="cap_warmup_steps=-1"):
        MoRConfig(cap_warmup_steps=-1)
    with pytest.raises(ConfigError, match="kv_sharing=true reuses the dense attention"):
        ModelConfig(dim=16, num_layers=4, num_heads=2, context=8, attention="switchhead",
                    depth_routing={"kind": "mor", "kv_sharing": True})
