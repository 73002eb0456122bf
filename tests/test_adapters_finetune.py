"""``moekit finetune``: adapters trained on a frozen base run by the ordinary trainer, read by eval and sample."""

from __future__ import annotations

import pytest
import torch

from moekit import adapters
from moekit.cli.main import main
from moekit.training import load_run
from moekit.training.checkpoint import adapters_path, has_checkpoint

DENSE = ["--model.dim=32", "--model.num_layers=2", "--model.num_heads=2", "--model.context=32",
         "--model.dense_hidden_dim=48", "--data.max_files=24", "--data.max_bytes=200000", "--train.batch_size=4",
         "--train.max_seconds=none", "--train.eval_batches=1", "--train.eval_every=0", "--train.device=cpu",
         "--train.threads=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "base"
    assert main(["train", "--preset", "dense", "--out", str(out), "--no-progress", "--train.max_steps=4", *DENSE]) == 0
    return out


def fails_with(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_list_prints_every_method(capsys):
    assert main(["finetune", "--list"]) == 0
    assert capsys.readouterr().out.split() == adapters.available()


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("mixlora", ["--targets", "ffn", "--adapter.num_experts=2",
                                                        "--adapter.rank=2"]),
                                           ("lora", ["--adapter.rank=2"]),
                                           ("mos", ["--adapter.rank=2"])])  # pools shared across layers
def test_finetune_trains_only_adapters_and_eval_sample_read_it(base_run, tmp_path, capsys, method, extra):
    out = tmp_path / method
    _, base_model, _ = load_run(base_run, "cpu")
    assert main(["finetune", str(base_run), "--method", method, "--out", str(out), "--no-progress",
                 "--data.source=arithmetic", "--train.max_steps=3", "--train.lr=0.05", *extra]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    header = adapters.read_header(adapters_path(out))
    assert header["method"] == method
    _, model, state = load_run(out, "cpu")
    assert state["step"] == 3 and adapters.adapters_of(model).method == method
    base_weights = base_model.state_dict()
    for name, value in model.state_dict().items():
        if ".adapter." not in name:  # the frozen base is the base run's, bit for bit
            assert torch.equal(value, base_weights[name.replace(".base.", ".")]), name
    trained = adapters.state_dict(model)
    assert any(k.endswith(("lora_B", "pool_B")) and v.abs().sum() > 0 for k, v in trained.items())  # B = 0: no learning
    assert main(["eval", str(out)]) == 0
    assert capsys.readouterr().out.startswith("step 3: validation loss")
    assert main(["sample", str(out), "--prompt", "1+", "-n", "5", "--temperature", "0"]) == 0
    assert main(["finetune", "--resume", str(base_run), "--method", method, "--out", str(out), "--no-progress",
                 "--train.max_steps=4", "--data.source=arithmetic", *extra]) == 0
    assert load_run(out, "cpu")[2]["step"] == 4


def test_finetune_bad_input_is_one_line_and_writes_nothing(base_run, tmp_path, capsys):
    out = tmp_path / "bad"
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--out", str(out), "--targets", "nope"],
               "match no nn.Linear")
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--out", str(out), "--adapter.rank=99"],
               "lora.rank=99 exceeds")
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--out", str(out), "--adapter.rank=2",
                        "--adapter.train_router_only=true"], "unknown config key 'lora.train_router_only'")
    fails_with(capsys, ["finetune", str(base_run), "--method", "nope", "--out", str(out)], "unknown adapter method")
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--out", str(out), "--model.dim=64"],
               "only train.* and data.*")
    fails_with(capsys, ["finetune", str(tmp_path / "missing"), "--method", "lora", "--out", str(out)],
               "does not exist")
    fails_with(capsys, ["finetune", "--method", "lora"], "finetune needs RUN or --hf PATH, --out")
    assert not out.exists()


def test_the_trainer_refuses_a_prepared_model_with_nothing_to_train(base_run, tmp_path):
    from moekit.configs import ConfigError
    from moekit.training import train
    from moekit.training.runs import read_run_config
    with pytest.raises(ConfigError, match="nothing to train"):
        train(read_run_config(base_run), tmp_path / "frozen", progress=False,
              prepare_model=lambda model: model.requires_grad_(False))
    assert not has_checkpoint(tmp_path / "frozen")


def test_router_only_regime_trains_the_routers_alone(base_run, tmp_path):
    from moekit.adapters.finetune import finetune
    result = finetune(base_run, tmp_path / "mixer", "lora_mixer", options={"rank": 2, "num_experts": 2, "top_k": 1,
                                                                          "train_router_only": True},
                      overrides={"train.max_steps": 2}, progress=False)
    assert result.trainable_params == 4 * 2 * 32  # four projections, a 2 x 32 router each


def test_finetune_with_a_companion_method_trains_both_and_eval_reads_them(base_run, tmp_path, capsys):
    """MixLoRA on the FFNs plus a companion LoRA on the attention (§15), through the CLI and the trainer."""
    out = tmp_path / "pair"
    assert main(["finetune", str(base_run), "--method", "mixlora", "--targets", "ffn", "--adapter.num_experts=2",
                 "--adapter.rank=2", "--companion", "lora", "--companion-targets", "w_qkv",
                 "--companion.rank=2", "--out", str(out), "--no-progress", "--data.source=arithmetic",
                 "--train.max_steps=3", "--train.lr=0.05"]) == 0
    assert "mixlora+lora:" in capsys.readouterr().out
    header = adapters.read_header(adapters_path(out))
    assert [(g["method"], g["config"]["rank"]) for g in header["groups"]] == [("mixlora", 2), ("lora", 2)]
    _, model, state = load_run(out, "cpu")
    handle = adapters.adapters_of(model)
    assert state["step"] == 3 and handle.method == "mixlora+lora"
    trained = handle.state_dict()
    for group in handle.groups:  # both groups learned: some B (zero at the start) moved
        assert any(k.startswith(tuple(n + "." for n in group.names)) and "lora_B" in k and v.abs().sum() > 0
                   for k, v in trained.items()), group.method
    assert main(["eval", str(out)]) == 0
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--companion", "nope", "--out",
                        str(tmp_path / "x")], "unknown adapter method 'nope'")
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--companion.rank=2", "--out",
                        str(tmp_path / "x")], "need --companion METHOD")
    fails_with(capsys, ["finetune", str(base_run), "--method", "lora", "--companion", "dynmole", "--out",
                        str(tmp_path / "x")], "already has lora adapters")
