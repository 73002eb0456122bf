"""The ``moekit`` command: the happy path on ``tiny``, and every user error as one line with exit status 2."""

import subprocess
import sys

import pytest

from moekit.cli import main as cli
from moekit.cli.main import main
from moekit.models import count
from moekit.recipes import load_preset
from moekit.training.checkpoint import checkpoint_dir, read_state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--train.max_steps=6",
                 "--train.eval_every", "0", "--model.moe.top_k=1"]) == 0
    return out


def fails_with(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_train_eval_sample(run_dir, capsys):
    assert load_preset("tiny").model.moe.top_k == 2
    assert '"top_k": 1' in (run_dir / "config.json").read_text()  # the override reached the run
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 6: validation loss") and "layers.1.ffn: load CV" in out
    assert main(["sample", str(run_dir), "--prompt", "import ", "-n", "20", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("import ")


def test_resume_continues_a_run(run_dir, capsys):
    assert main(["train", "--resume", "--out", str(run_dir), "--train.max_steps=8", "--no-progress"]) == 0
    assert read_state(run_dir)["step"] == 8


def test_info_and_presets(capsys):
    assert main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"default", "dense", "tiny"} <= set(names)
    assert main(["info", "--preset", "default"]) == 0
    out = capsys.readouterr().out
    c = count(load_preset("default").model)
    assert f"{c.total_params:,}" in out and f"{c.active_params:,}" in out and f"{c.flops_per_token:,}" in out
    dense = count(load_preset("dense").model)
    assert abs(dense.active_params - c.active_params) / c.active_params < 0.01  # equal active parameters


def test_config_file_lays_over_preset(tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text("[model]\nnum_layers = 3\n[model.moe]\nnum_experts = 6\n")
    assert main(["info", "--preset", "tiny", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and "6 experts x hidden 32" in out  # file values over tiny's own


def test_user_errors_are_one_line_exit_2(capsys, tmp_path, run_dir):
    fails_with(capsys, ["info", "--model.moe.topk=1"], "unknown config key 'model.moe.topk'",
               "did you mean 'model.moe.top_k'")
    fails_with(capsys, ["info", "--model.moe.top_k=33"], "top_k=33 exceeds num_experts=32", "lower top_k")
    fails_with(capsys, ["info", "--train.lr=fast"], "train.lr='fast' is not a number")
    fails_with(capsys, ["train", "--preset", "tinny"], "unknown preset 'tinny'", "did you mean 'tiny'")
    fails_with(capsys, ["info", "stray"], "unrecognised argument 'stray'")
    fails_with(capsys, ["eval", str(tmp_path / "missing")], "does not exist")
    fails_with(capsys, ["train", "--resume"], "--resume needs --out")
    fails_with(capsys, ["info", "--config", str(tmp_path / "nope.toml")], "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    fails_with(capsys, ["info", "--config", str(bad)], "invalid TOML")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    # the old layout (files at the top of the folder) is still read
    (corrupt / "state.json").write_bytes((checkpoint_dir(run_dir) / "state.json").read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    fails_with(capsys, ["sample", str(corrupt)], "model.safetensors is corrupt")
    (corrupt / "model.safetensors").unlink()
    fails_with(capsys, ["eval", str(corrupt)], "model.safetensors is missing")
    (corrupt / "config.json").write_text("{not json")
    fails_with(capsys, ["eval", str(corrupt)], "config.json is corrupt")


def test_missing_command_modules_are_skipped(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("not_written_yet",))
    assert main(["presets"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["not_written_yet"])
    assert exit_info.value.code == 2


def test_python_dash_m_moekit():
    result = subprocess.run([sys.executable, "-m", "moekit", "info", "--model.dim=abc"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "model.dim='abc' is not an integer" in result.stderr
