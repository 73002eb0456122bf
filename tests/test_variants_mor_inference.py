"""Mixture-of-Recursions causal inference (architectures.md §9, "use a per-token threshold on the BCE-trained
router output"): against a readable reference, causal in a real model, and equal to top-k routing where the
router separates the top-k tokens at the threshold."""

import pytest
import torch

from moekit import FeedForward, RoutingContext
from moekit.configs import ConfigError
from moekit.layers.variants.mor import MixtureOfRecursions, MoRConfig
from moekit.models import LanguageModel, ModelConfig


def _mixing_block(dim=8, keep=0):
    """A causal block whose output depends on the earlier tokens it is given (running mean); its first ``keep``
    output features are zero, so the routers that read only those features see the same input at every step."""
    torch.manual_seed(0)
    ffn = FeedForward(dim, 16)

    def block(h_BKD, ctx=None):
        mean_BKD = h_BKD.cumsum(1) / torch.arange(1, h_BKD.shape[1] + 1)[:, None]
        out_BKD = h_BKD + ffn(mean_BKD)
        return torch.cat([torch.zeros_like(out_BKD[..., :keep]), out_BKD[..., keep:]], -1)
    return block


def _threshold_reference(mor, x_BSD, block):
    """Sequence by sequence, step by step, token by token: a candidate runs step r iff its router's sigmoid
    exceeds the threshold (every candidate at capacity 1); the block sees the step's tokens in causal order."""
    c = mor.config
    rows, depths = [], []
    for b in range(x_BSD.shape[0]):
        h_SD, active = x_BSD[b].clone(), list(range(x_BSD.shape[1]))
        depth = [0] * x_BSD.shape[1]
        for r, cap in enumerate(c.schedule()):
            p_S = (h_SD @ mor.routers[r].weight[0] / c.temperature).sigmoid()
            decide_S = p_S if mor.aux_routers is None else (h_SD @ mor.aux_routers[r].weight[0]).sigmoid()
            if cap < 1:
                active = [t for t in active if decide_S[t] > c.threshold]
            if not active:
                break
            out_KD = block(h_SD[active][None])[0]
            for i, t in enumerate(active):
                h_SD[t] = h_SD[t] + c.alpha * p_S[t] * out_KD[i]
                depth[t] += 1
        rows.append(h_SD)
        depths.append(depth)
    return torch.stack(rows), torch.tensor(depths, dtype=torch.float)


@pytest.mark.parametrize("B,S,n,router", [(3, 7, 3, "main"), (1, 1, 2, "main"), (2, 5, 4, "main"),
                                           (3, 7, 3, "aux")])
def test_threshold_inference_matches_the_reference(B, S, n, router):
    block = _mixing_block()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=n, inference_router=router), name="mor").eval()
    torch.manual_seed(1)
    x = torch.randn(B, S, 8)
    ctx = RoutingContext(collect_stats=True)
    with torch.no_grad():
        out = mor(x, block, ctx)
        ref, depth_BS = _threshold_reference(mor, x, block)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert abs(ctx.stats_summary()["mor"]["mean_depth"] - float(depth_BS.mean())) < 1e-6
    if (B, S, n) == (3, 7, 3):  # the sequences got different depths: the per-sequence path ran
        assert len({tuple(d) for d in depth_BS.tolist()}) > 1 and 1 < float(depth_BS.mean()) < n


def test_no_token_passes_leaves_the_input_and_a_lower_threshold_runs_more():
    block = _mixing_block()
    x = torch.randn(2, 6, 8)
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3)).eval()
    with torch.no_grad():
        for r in (1, 2):
            mor.routers[r].weight.fill_(0.0)  # sigmoid(0) = 0.5 is not > 0.5: nobody runs steps 1 and 2
        ctx = RoutingContext(collect_stats=True)
        out = mor(x, block, ctx)
        g = 0.1 * mor.routers[0](x).sigmoid()
        torch.testing.assert_close(out, x + g * block(x))  # step 0 (capacity 1) only
        assert abs(ctx.stats_summary()["mor"]["mean_depth"] - 1.0) < 1e-6
        low = MixtureOfRecursions(8, MoRConfig(num_recursions=3, threshold=0.4)).eval()
        low.load_state_dict(mor.state_dict())
        ctx = RoutingContext(collect_stats=True)
        low(x, block, ctx)
        assert abs(ctx.stats_summary()["mor"]["mean_depth"] - 3.0) < 1e-6  # 0.5 > 0.4: everyone runs


def _separated_inputs():
    """Routers that read feature r only, and inputs whose feature r is positive on exactly the top-k tokens of
    step r among step r-1's (capacities 1, 4/6, 2/6 of 6 tokens), per sequence."""
    x = torch.randn(2, 6, 8)
    x[..., 1:3] = -x[..., 1:3].abs() - 0.1
    for b, (step1, step2) in enumerate((([0, 2, 3, 5], [2, 5]), ([1, 2, 4, 5], [1, 4]))):
        x[b, step1, 1] = torch.rand(4) + 0.1
        x[b, step2, 2] = torch.rand(2) + 0.1
    return x


def _routers_on_features(mor):
    with torch.no_grad():
        for r, router in enumerate(mor.routers):
            router.weight.zero_()
            router.weight[0, r] = 3.0


def test_threshold_agrees_with_top_k_when_the_router_separates_the_top_k():
    block = _mixing_block(keep=3)
    x = _separated_inputs()
    outs = {}
    for mode in ("threshold", "expert_choice"):
        mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, eval_routing=mode))
        _routers_on_features(mor)
        with torch.no_grad():
            outs[mode] = mor.eval()(x, block)
            outs["train"] = mor.train()(x, block)  # training always routes by top-k
    torch.testing.assert_close(outs["threshold"], outs["expert_choice"])
    torch.testing.assert_close(outs["train"], outs["expert_choice"])
    # one extra token above the threshold at step 2 breaks the agreement (the test can fail)
    x[0, 0, 2] = 1.0
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3))
    _routers_on_features(mor)
    ref = MixtureOfRecursions(8, MoRConfig(num_recursions=3, eval_routing="expert_choice"))
    _routers_on_features(ref)
    with torch.no_grad():
        assert not torch.allclose(mor.eval()(x, block), ref.eval()(x, block))


def test_aux_router_loss_trains_only_the_aux_routers_and_the_threshold_reads_them():
    block = _mixing_block(keep=3)
    x = _separated_inputs()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3, inference_router="aux", aux_coef=0.3))
    _routers_on_features(mor)
    ctx = RoutingContext()
    mor(x, block, ctx)
    assert "mor_router_loss" not in ctx.losses, "with an auxiliary router the main router gets no BCE loss"
    loss = ctx.losses["mor_aux_router_loss"]
    grads = torch.autograd.grad(loss, list(mor.parameters()), allow_unused=True)
    named = {n: g for (n, _), g in zip(mor.named_parameters(), grads)}
    assert all(named[f"routers.{r}.weight"] is None for r in range(3))
    assert all(named[f"aux_routers.{r}.weight"] is not None for r in range(3))
    # its value: 0.3 * the mean BCE over each step's candidates, summed over steps. The aux routers read feature 1
    # (which the block never changes): logit = x[..., 1]; targets are the main routers' top-k sets
    with torch.no_grad():
        for aux in mor.aux_routers:
            aux.weight.zero_()
            aux.weight[0, 1] = 1.0
    ctx = RoutingContext()
    mor(x, block, ctx)
    every = torch.ones(2, 6, dtype=torch.bool)
    step1, step2 = x[..., 1] > 0, (x[..., 1] > 0) & (x[..., 2] > 0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = sum(0.3 * bce(x[..., 1][cand], sel[cand].float())
                   for cand, sel in ((every, every), (every, step1), (step1, step2)))
    torch.testing.assert_close(ctx.losses["mor_aux_router_loss"], expected)
    # evaluation: zero aux routers give sigmoid 0.5, not > 0.5: only step 0 (capacity 1) runs, whatever the main
    # routers say; aux routers equal to the main ones reproduce top-k
    ctx = RoutingContext(collect_stats=True)
    with torch.no_grad():
        for aux in mor.aux_routers:
            aux.weight.zero_()
        mor.eval()(x, block, ctx)
        assert abs(ctx.stats_summary()["mor"]["mean_depth"] - 1.0) < 1e-6
        for aux, main in zip(mor.aux_routers, mor.routers):
            aux.weight.copy_(main.weight)
        topk = MixtureOfRecursions(8, MoRConfig(num_recursions=3, eval_routing="expert_choice"))
        _routers_on_features(topk)
        torch.testing.assert_close(mor(x, block), topk.eval()(x, block))


def test_threshold_agreement_statistic_in_training():
    block = _mixing_block(keep=3)
    x = _separated_inputs()
    mor = MixtureOfRecursions(8, MoRConfig(num_recursions=3), name="mor")
    _routers_on_features(mor)
    ctx = RoutingContext(collect_stats=True)
    mor(x, block, ctx)
    assert abs(ctx.stats_summary()["mor"]["threshold_agreement"] - 1.0) < 1e-6
    with torch.no_grad():
        for router in mor.routers:
            router.weight.zero_()  # every decision "no"; top-k picks by position among ties
    ctx = RoutingContext(collect_stats=True)
    mor(x, block, ctx)
    # steps of capacity < 1: step 1 keeps 4 of 6 (agreement 2/6), step 2 keeps 2 of 4 (2/4)
    assert abs(ctx.stats_summary()["mor"]["threshold_agreement"] - (2 / 6 + 2 / 4) / 2) < 1e-6


def _mor_model(**depth):
    cfg = ModelConfig(dim=16, num_layers=4, num_heads=2, context=12,
                      depth_routing={"kind": "mor", "num_recursions": 3, **depth})
    torch.manual_seed(0)
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("options", [{}, {"kv_sharing": True}, {"inference_router": "aux"}])
def test_inference_is_causal_in_the_model(options):
    model = _mor_model(**options)
    torch.manual_seed(2)
    tokens = torch.randint(0, 256, (3, 12))
    with torch.no_grad():
        full, ctx = model(tokens, RoutingContext(collect_stats=True))
        depth = ctx.stats_summary()["mor"]["mean_depth"]
        assert 1 < depth < 3, "the threshold keeps some tokens and drops others (else the test shows little)"
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 256
        torch.testing.assert_close(model(changed)[0][:, :-1], full[:, :-1], rtol=0, atol=1e-5)
        for t in (1, 5, 9):  # a prefix gives the same outputs as the full sequence at its positions
            torch.testing.assert_close(model(tokens[:, :t])[0], full[:, :t], rtol=0, atol=1e-5)
    # top-k over the sequence (the training rule) is not causal: the same check fails
    topk = _mor_model(**options, eval_routing="expert_choice")
    with torch.no_grad():
        assert not torch.allclose(topk(tokens[:, :5])[0], topk(tokens)[0][:, :5], atol=1e-5)


def test_inference_option_errors():
    with pytest.raises(ConfigError, match="variant.eval_routing"):
        MoRConfig(eval_routing="top_p")
    with pytest.raises(ConfigError, match=r"variant.threshold=1.5 must be in \(0, 1\)"):
        MoRConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="variant.inference_router"):
        MoRConfig(inference_router="both")
    with pytest.raises(ConfigError, match="inference_router='aux' is for routing='expert_choice'"):
        MoRConfig(routing="token_choice", inference_router="aux")
