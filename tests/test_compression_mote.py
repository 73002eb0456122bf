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
    s = float(torch.tensor(float(w.detach().abs().mean()) + 1e-5).half())  # the scale is float16-exact
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


# --- moekit compress RUN --method mote: the trained MoTE model saved as a compressed run folder -----------------

DENSE = ["--preset", "dense", "--no-progress", "--train.max_steps=4", "--train.eval_every=0", "--model.dim=32",
         "--model.num_layers=2", "--model.num_heads=2", "--model.context=32", "--model.dense_hidden_dim=48",
         "--data.max_files=8", "--train.batch_size=4"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mote") / "dense"
    assert main(["train", "--out", str(out), *DENSE]) == 0
    return out


def test_export_gives_the_qat_models_logits_and_its_exact_ternary_weights(dense_run):
    from moekit.compression.bank import CompressedBank
    from moekit.compression.mote import export_mote
    from moekit.training.runs import read_run_config
    torch.manual_seed(0)
    model, _ = mote_qat(dense_run, 3, steps=3, lr=1e-2)
    exported, cfg = export_mote(model, read_run_config(dense_run).model)
    assert cfg.moe.top_k == 1 and cfg.moe.num_shared_experts == 1
    x = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        want, got = model(x)[0], exported(x)[0]
    assert torch.equal(want, got)
    for mote_block, block in zip(model.layers, exported.layers, strict=True):
        bank = block.ffn.experts
        assert isinstance(bank, CompressedBank) and bank.spec.format == "ternary" and bank.spec.act_bits == 8
        for e in range(3):
            stored = bank.weights(e)
            for m, w in mote_block.ffn.ternary_weights(e).items():
                assert torch.equal(stored[m], w.detach())
                assert stored[m].abs().unique().numel() <= 2  # {0, s}
    # QAT moved the experts away from their upcycled init, so the equalities above are not trivial
    moved = model.layers[0].ffn.experts.w_up.detach() - model.layers[0].ffn.shared.w_up.detach()
    assert moved.abs().max() > 0


def test_compress_mote_writes_a_run_that_reloads_with_the_same_logits(dense_run, tmp_path, capsys):
    from moekit.compression.mote import compress_mote_run
    from moekit.training import load_run
    out = tmp_path / "mote"
    torch.manual_seed(0)
    report, exported = compress_mote_run(dense_run, out, steps=2, num_experts=2)
    _, loaded, _ = load_run(out, "cpu")
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], exported(x)[0])
    # 2-bit packed codes plus per-row float16 lo/hi: bits per parameter on disk, computed from the shapes
    D, F_ = 32, 48
    rows_cols = [(F_, D), (F_, D), (D, F_)]
    bits = sum(r * ((c + 7) // 8) * 16 + r * 32 for r, c in rows_cols) / sum(r * c for r, c in rows_cols)
    slot_map = 64 / sum(r * c for r, c in rows_cols)  # one int64 slot entry per expert
    assert report.bits_per_param == pytest.approx(bits + slot_map)
    assert report.bits_per_param < 3.5
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["sample", str(out), "--prompt", "def ", "-n", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["analyze", str(out), "--out", str(tmp_path / "an")]) == 0


def test_mote_cli_and_its_bad_input(dense_run, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(dense_run), "--method", "mote", "--steps", "1", "--out", str(out)]) == 0
    assert "bits per expert parameter" in capsys.readouterr().out
    bad = tmp_path / "bad"

    def fails(argv, fragment):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err
        assert not bad.exists() and not list(tmp_path.glob(".bad*"))

    fails(["compress", str(dense_run), "--method", "mote", "--steps", "0", "--out", str(bad)], "--steps=0")
    fails(["compress", str(dense_run), "--method", "mote", "--bits", "4", "--out", str(bad)], "bits")
    fails(["compress", str(dense_run), "--method", "rtn", "--steps", "3", "--out", str(bad)], "--steps is for")
    fails(["compress", str(out), "--method", "mote", "--out", str(bad)], "not a dense run")
    fails(["compress", str(dense_run), "--method", "mote", "--out", str(out)], "not empty")
