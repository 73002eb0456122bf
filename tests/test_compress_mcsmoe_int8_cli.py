"""The CLI side of this round's compression work on a tiny trained run: ``moekit compress --method mc-smoe``
writes a run folder eval/sample read, and ``moekit eval`` / ``sample --matmul int8`` run int banks through
``torch._int_mm`` (close to the dequantise path), refusing banks of other formats with one line."""

import json

import pytest
import torch

from moekit.cli.main import main
from moekit.training import load_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mcint8") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--train.max_steps=8",
                 "--train.eval_every", "0"]) == 0
    return out


def fails_with(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def compressed(run_dir, tmp_path, capsys, name, *args):
    out = tmp_path / name
    assert main(["compress", str(run_dir), *args, "--out", str(out), "--calibration-tokens", "512"]) == 0
    capsys.readouterr()
    return out


def test_mc_smoe_run_folder_is_read_by_eval_and_sample(run_dir, tmp_path, capsys):
    out = compressed(run_dir, tmp_path, capsys, "mc", "--method", "mc-smoe", "--target-memory", "0.25",
                     "--final-threshold", "0.2")
    header = json.loads((out / "compression.json").read_text())
    banks = [layer["bank"] for layer in header["layers"].values()]
    assert {b["format"] for b in banks} == {"lowrank-sparse"} and all(b["rank"] >= 1 for b in banks)
    assert header["report"]["memory_fraction"] <= 0.25
    _, float_model, _ = load_run(run_dir, "cpu")
    _, model, _ = load_run(out, "cpu")
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = float_model(x)[0], model(x)[0]
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["sample", str(out), "--prompt", "def ", "-n", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    fails_with(capsys, ["eval", str(out), "--matmul", "int8"], "lowrank-sparse", "--method rtn")
    fails_with(capsys, ["compress", str(run_dir), "--method", "rtn", "--rank", "4", "--out", str(tmp_path / "x")],
               "--rank")
    assert not (tmp_path / "x").exists()


def test_matmul_int8_from_the_cli_is_close_to_the_dequantise_path(run_dir, tmp_path, capsys):
    out = compressed(run_dir, tmp_path, capsys, "rtn8", "--method", "rtn", "--bits", "8")
    _, deq, _ = load_run(out, "cpu")
    _, fast, _ = load_run(out, "cpu", "int8")
    assert {b.ffn.experts.matmul for b in fast.layers} == {"int8"}
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = deq(x)[0], fast(x)[0]
    # int8 per-token activations: measured 0.69% mean relative difference of the logits on this run
    assert 0 < (got - ref).abs().mean() < 0.02 * ref.abs().mean()
    results = {}
    for mode in ("dequantize", "int8"):
        assert main(["eval", str(out), "--batches", "1", "--json", "--matmul", mode]) == 0
        results[mode] = json.loads(capsys.readouterr().out)["val_bpb"]
    assert results["int8"] != results["dequantize"]
    assert abs(results["int8"] - results["dequantize"]) < 0.01
    assert main(["sample", str(out), "--prompt", "def ", "-n", "6", "--temperature", "0", "--matmul", "int8"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_matmul_int8_refuses_banks_without_integer_codes(run_dir, tmp_path, capsys):
    fails_with(capsys, ["eval", str(run_dir), "--matmul", "int8"], "not compressed")
    out = compressed(run_dir, tmp_path, capsys, "q", "--method", "qmoe", "--bits", "1.5")
    fails_with(capsys, ["sample", str(out), "--matmul", "int8", "-n", "2"], "--matmul int8 needs integer-coded",
               "tunstall")
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main(["eval", str(out), "--matmul", "int4"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
