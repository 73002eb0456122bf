"""``moekit finetune RUN --loop sema|mome``: SEMA's continual loop and MoME's multi-scale loop on a trained run,
through the command; the result reads with load_run / moekit eval; bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from moekit import adapters
from moekit.adapters.loop_finetune import task_sampler
from moekit.adapters.loops import sema_continual
from moekit.cli.main import main
from moekit.models import LanguageModel
from moekit.training import load_run
from moekit.training.runs import read_run_config
from moekit.training.checkpoint import adapters_path, load_checkpoint, loop_report_path

from .test_adapters_finetune import DENSE, fails_with

SEMA = ["--targets", "w_qkv", "--adapter.bottleneck=4", "--adapter.descriptor_dim=8"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "base"
    assert main(["train", "--preset", "dense", "--out", str(out), "--no-progress", "--train.max_steps=2", *DENSE]) == 0
    return out


def _frozen_base_unchanged(base_run, out):
    _, base_model, _ = load_run(base_run, "cpu")
    _, model, state = load_run(out, "cpu")
    base = base_model.state_dict()
    for name, value in model.state_dict().items():
        if ".adapter." not in name:
            assert torch.equal(value, base[name.replace(".base.", ".")]), name
    return model, state


def test_sema_loop_through_the_cli_is_the_library_loop(base_run, tmp_path, capsys):
    out = tmp_path / "sema"
    assert main(["finetune", str(base_run), "--loop", "sema", "--tasks", "add,sort", "--out", str(out),
                 "--train.max_steps=3", "--train.lr=0.01", *SEMA]) == 0
    printed = capsys.readouterr().out
    assert "task 0 (add)" in printed and "task 1 (sort)" in printed and "adapters in" in printed
    report = json.loads(loop_report_path(out).read_text())
    assert report["loop"] == "sema" and [r["name"] for r in report["report"]] == ["add", "sort"]
    first = report["report"][0]
    assert first["expanded"] == [] and first["trainable"] > 0 and first["first_loss"] is not None
    model, state = _frozen_base_unchanged(base_run, out)
    assert state["step"] == 3 * 2 and adapters.adapters_of(model).method == "sema"
    # the same loop called from the library on the same base, samplers and seed gives the same adapters
    cfg = read_run_config(out)
    torch.manual_seed(cfg.train.seed)
    ref = LanguageModel(cfg.model)
    load_checkpoint(base_run, ref)
    handle = adapters.apply(ref, "sema", ["w_qkv"], bottleneck=4, descriptor_dim=8)
    sema_continual(ref, [task_sampler("add", cfg), task_sampler("sort", cfg)], steps=3, lr=0.01,
                   seed=cfg.train.seed)
    got = adapters.state_dict(model)
    want = handle.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert main(["eval", str(out)]) == 0


def test_mome_loop_through_the_cli(base_run, tmp_path, capsys):
    out = tmp_path / "mome"
    assert main(["finetune", str(base_run), "--loop", "mome", "--rates", "1,2", "--out", str(out),
                 "--train.max_steps=3", "--targets", "w_qkv", "--adapter.rank=2"]) == 0
    assert "mome: loss" in capsys.readouterr().out
    report = json.loads(loop_report_path(out).read_text())
    assert report["rates"] == [1, 2] and len(report["report"]) == 3
    assert all({"loss", "loss_r1", "loss_r2"} <= set(r) for r in report["report"])
    model, state = _frozen_base_unchanged(base_run, out)
    assert state["step"] == 3 and adapters.adapters_of(model).method == "mome"
    trained = adapters.state_dict(model)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in trained.items()), "B = 0 at start: trained"


def test_loop_bad_input_is_one_line_and_writes_nothing(base_run, tmp_path, capsys):
    out = tmp_path / "bad"
    run = ["finetune", str(base_run), "--out", str(out)]
    cases = [
        (run + ["--tasks", "add"], ["--tasks needs --loop sema"]),
        (run + ["--loop", "sema"], ["the sema loop needs tasks"]),
        (run + ["--loop", "sema", "--tasks", "add,fly"], ["unknown task(s) ['fly']", "copy"]),
        (run + ["--loop", "mome", "--rates", "3"], ["divide the context 32"]),
        (run + ["--loop", "mome", "--rates", "1,x"], ["--rates '1,x' must be comma-separated integers"]),
        (run + ["--loop", "mome", "--tasks", "add"], ["--tasks is for --loop sema, not --loop mome"]),
        (run + ["--loop", "sema", "--tasks", "add", "--method", "lora"], ["not --method lora"]),
        (run + ["--loop", "sema", "--tasks", "add", "--resume"], ["without --resume"]),
        (run + ["--loop", "sema", "--tasks", "add", "--model.dim=8"], ["only train.* and data.*"]),
        (run + ["--loop", "sema", "--tasks", "add", "--adapter.bogus=1"], ["bogus"]),
        (["finetune", "--loop", "mome", "--out", str(out)], ["--loop needs RUN"]),
    ]
    for argv, fragments in cases:
        fails_with(capsys, argv, *fragments)
        assert not out.exists(), argv
    assert main(run + ["--loop", "mome", "--rates", "1", "--train.max_steps=1", "--adapter.rank=2"]) == 0
    capsys.readouterr()
    fails_with(capsys, run + ["--loop", "mome", "--rates", "1", "--train.max_steps=1"], "already holds")
    assert adapters.read_header(adapters_path(out))["method"] == "mome"
