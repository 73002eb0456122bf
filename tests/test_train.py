"""Training: short runs of the ``tiny`` preset learn, resume exactly, and round-trip their checkpoints."""

import json
import math

import pytest
import torch

from moekit.configs import to_dict
from moekit.data import load_data
from moekit.models import LanguageModel
from moekit.recipes import load_preset
from moekit.training import (CheckpointError, evaluate_run, load_checkpoint, load_run, save_checkpoint, train,
                             train_step, with_overrides)
from moekit.training.checkpoint import checkpoint_dir, weights_path
from moekit.training.optim import build_optimizer, learning_rate


def tiny(**overrides):
    return with_overrides(load_preset("tiny"), overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return train(tiny(), out, progress=False)


def test_tiny_run_learns_and_writes_its_folder(tiny_run):
    losses = tiny_run.losses
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    summary = tiny_run.summary
    assert summary["val_loss"] < math.log(256) - 1.0  # well below a uniform guess over bytes
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    assert summary["tokens"] == 40 * 4 * 32 and summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1
    assert set(summary["layers"]) == {"layers.0.ffn", "layers.1.ffn"}
    out = tiny_run.out_dir
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "expert_load.png"):
        assert (out / name).is_file(), name
    assert [p.name for p in (out / "ckpt").iterdir()] == ["step_00000040"]  # one complete set, nothing else
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        assert (out / "ckpt" / "step_00000040" / name).is_file(), name
    assert weights_path(out) == out / "ckpt" / "step_00000040" / "model.safetensors"
    assert json.loads((out / "config.json").read_text()) == to_dict(tiny())
    vals = [r for r in tiny_run.records if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40]
    assert vals[-1]["val_loss"] == pytest.approx(summary["val_loss"])
    # each evaluation logs its per-layer routing statistics; the last one is the summary's
    assert all(set(r["layers"]) == {"layers.0.ffn", "layers.1.ffn"} for r in vals)
    assert vals[-1]["layers"] == summary["layers"]
    assert vals[0]["layers"] != vals[-1]["layers"]  # measured at each evaluation, not copied


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny(**{"train.max_steps": "12", "train.eval_every": "5", "model.moe.router.bias_update_rate": "0.01"})
    whole = train(cfg, tmp_path / "whole", progress=False)
    first = train(cfg, tmp_path / "split", until_step=7, progress=False)
    assert first.summary["step"] == 7 and not (tmp_path / "split" / "summary.json").exists()
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.losses == whole.losses  # bit-exact, step by step
    assert resumed.summary["val_loss"] == whole.summary["val_loss"]
    a = load_run(tmp_path / "whole")[1].state_dict()
    b = load_run(tmp_path / "split")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["layers.0.ffn.router.expert_bias"].abs().sum() > 0  # the aux-free bias was updated and saved


def test_checkpoint_round_trip_reproduces_logits_and_optimizer(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    opt = build_optimizer(model, cfg.train)
    data = load_data(cfg.data)
    for step in range(3):
        train_step(model, opt, data, cfg, step, torch.device("cpu"))
    save_checkpoint(tmp_path, model, opt, {"step": 3})
    clone = LanguageModel(cfg.model)
    clone_opt = build_optimizer(clone, cfg.train)
    assert load_checkpoint(tmp_path, clone, clone_opt)["step"] == 3
    tokens = torch.randint(0, 256, (2, 32))
    assert torch.equal(model.eval()(tokens)[0], clone.eval()(tokens)[0])
    model.train(), clone.train()
    # The next step from the restored optimizer is the same step.
    assert train_step(model, opt, data, cfg, 3, torch.device("cpu")) == \
        train_step(clone, clone_opt, data, cfg, 3, torch.device("cpu"))


def test_checkpoint_errors_are_clear(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="already holds a run"):
        train(tiny(), tiny_run.out_dir, progress=False)
    broken = tmp_path / "broken"
    (broken / "ckpt" / "step_00000040").mkdir(parents=True)
    (broken / "config.json").write_bytes((tiny_run.out_dir / "config.json").read_bytes())
    ckpt, src = broken / "ckpt" / "step_00000040", checkpoint_dir(tiny_run.out_dir)
    for name in ("state.json", "optimizer.safetensors"):
        (ckpt / name).write_bytes((src / name).read_bytes())
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_run(broken)
    (ckpt / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (ckpt / "state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match="from step 40 but state.json says step 3"):
        load_run(broken)
    with pytest.raises(CheckpointError, match="model in .* differs"):
        train(tiny(**{"model.dim": "64"}), broken, resume=True, progress=False)


def test_evaluate_run_matches_training_summary(tiny_run):
    result = evaluate_run(tiny_run.out_dir)
    assert result["step"] == 40
    assert result["val_loss"] == pytest.approx(tiny_run.summary["val_loss"], rel=1e-6)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = tiny(**{"train.lr": "1.0", "train.warmup_steps": "4", "train.min_lr_ratio": "0.1"}).train
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(0.25)
    assert learning_rate(cfg, 3, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 50, 0.5) == pytest.approx(0.55)
    assert learning_rate(cfg, 99, 1.0) == pytest.approx(0.1)


def test_bfloat16_and_accumulation_run(tmp_path):
    cfg = tiny(**{"train.dtype": "bfloat16", "train.grad_accum": "2", "train.max_steps": "3",
                  "train.eval_every": "0"})
    result = train(cfg, tmp_path, progress=False)
    assert result.summary["tokens"] == 3 * 2 * 4 * 32
    assert all(math.isfinite(x) for x in result.losses)


def test_on_step_hooks_see_every_step():
    cfg = tiny()
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    calls = []
    model.layers[0].ffn.on_step = calls.append
    opt = build_optimizer(model, cfg.train)
    data = load_data(cfg.data)
    for step in range(2):
        train_step(model, opt, data, cfg, step, torch.device("cpu"))
    assert calls == [1, 2]


def test_tokenizer_larger_than_model_vocab_is_a_clear_error(tmp_path, monkeypatch):
    from moekit.configs import ConfigError
    from moekit.data import tokenizers

    class Wide(tokenizers.ByteTokenizer):
        vocab_size = 300

    monkeypatch.setattr("moekit.data.dataset.get_tokenizer", lambda name: Wide())
    with pytest.raises(ConfigError, match="--model.vocab_size=300"):
        train(tiny(), tmp_path, progress=False)
