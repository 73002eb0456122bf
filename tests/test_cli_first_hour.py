"""The command line a new user meets: --help everywhere, moekit config, --threads, analyze's folder and table,
progress with ETA for analyze and bench."""

import argparse
import json
import re

import pytest
import torch

from moekit.cli.main import build_parser, main
from moekit.cli.sample import decoding_threads
from moekit.config_help import describe_config, field_docs
from moekit.recipes import list_presets, load_preset
from moekit.training import TrainConfig


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_subcommand_help_is_plain_and_shows_defaults(capsys):
    choices = _subparsers()
    assert {"train", "eval", "sample", "analyze", "bench", "compare", "config", "report"} <= set(choices)
    for name, p in choices.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert p.description and len(p.description) > 20, name
        assert "``" not in text and "::\n" not in text and "python -m moekit.cli" not in text, name
        examples = [line for line in text.splitlines() if line.strip().startswith(("moekit ", "python "))]
        assert all(line.strip().startswith("moekit ") for line in examples), (name, examples)
        for action in p._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                assert "default" in p.formatter_class(name)._get_help_string(action), (name, action.dest)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "moekit config --preset default" in capsys.readouterr().out


def test_config_lists_every_key_with_default_and_meaning(capsys):
    for name, _ in list_presets():
        rows = describe_config(load_preset(name))
        missing = [key for key, _, meaning in rows if not meaning]
        assert not missing, (name, missing)
    assert main(["config", "--preset", "default", "--train.lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert "\ntrain.max_steps = 256\n    optimizer steps;" in out and "\ntrain.lr = 0.001\n" in out
    assert "\nmodel.moe.router.num_groups = 1\n    group-limited routing" in out
    keys = re.findall(r"^([a-z_.0-9]+) = ", out, flags=re.MULTILINE)
    assert len(keys) == len([r for r in describe_config(load_preset("default")) if r[1] != ""])
    assert field_docs(TrainConfig)["beta2"].startswith("AdamW moment")  # "beta1, beta2:" names both


def test_config_errors_are_one_line(capsys):
    assert main(["config", "--preset", "nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_decoding_threads_default():
    assert decoding_threads(13_000_000, None) == 1
    assert decoding_threads(7_000_000_000, None) is None
    assert decoding_threads(13_000_000, 2) == 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("first_hour") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--train.max_steps=2",
                 "--train.eval_every=0", "--train.eval_batches=1"]) == 0
    return run


def test_analyze_writes_into_the_run_with_integer_counts_and_progress(tiny_run, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["analyze", str(tiny_run), "--stdlib", "12", "--no-plots", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    report = json.loads((tiny_run / "analysis" / "report.json").read_text())
    assert [r["name"] for r in report["layers"]] == ["layers.0.ffn", "layers.1.ffn"]
    table = (tiny_run / "analysis" / "table.txt").read_text()
    row = next(line for line in table.splitlines() if line.startswith("layers.0.ffn")).split()
    assert row[1] == f"{report['layers'][0]['tokens']:,}" and row[-1] == str(len(report["layers"][0]["dead"]))
    assert "load_cv: coefficient of variation" in table and "n/m" in table
    assert "100% passage 12/12" in captured.err and "ETA" in captured.err


def test_bench_quick_shows_progress(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--tokens", "32", "--repeats", "1", "--out", str(out), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "100% round 6/6" in captured.err and "ETA 0:00" in captured.err
    result = json.loads(out.read_text())
    assert [r["shape"] for r in result] == ["mixtral-s"] and result[0]["tokens"] == 32 and result[0]["repeats"] == 1
    assert "moekit-sorted" in captured.out
    # by default both CPU engines that ``auto`` chooses between (by the experts' width) are timed
    assert {"moekit-sorted", "moekit-sorted_blocked"} <= set(result[0]["results"])


def test_threads_must_be_positive(capsys):
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads 0 must be >= 1" in capsys.readouterr().err


def test_wrong_folders_and_unwritable_outputs_are_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a folder is needed: nothing can be written under it
    for argv, fragment in ((["analyze", str(tmp_path / "not_a_run"), "--no-progress"], "config.json is missing"),
                           (["eval", str(tmp_path / "not_a_run")], "moekit run folder"),
                           (["sample", str(tmp_path / "not_a_run")], "moekit run folder"),
                           (["analyze", str(tiny_run), "--no-progress", "--out", str(blocker / "a")],
                            "choose a writable --out"),
                           (["report", str(tiny_run), "--samples", "0", "--out", str(blocker / "r.html")],
                            "does not exist")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "not_a_run"]
    assert list((tmp_path / "not_a_run").iterdir()) == []


def test_compare_shows_progress_with_eta(tmp_path, capsys):
    study = tmp_path / "small.toml"
    study.write_text('description = "two tiny arms"\nbase = "tiny"\nseeds = [0]\n[budget]\nkind = "tokens"\n'
                     'tokens = 640\n[overrides]\ntrain = { eval_every = 0, eval_batches = 1 }\n'
                     '[[arms]]\nname = "top2"\n[[arms]]\nname = "top1"\noverrides = { model = { moe = { top_k = 1 } } }\n')
    assert main(["compare", str(study), "--workers", "0", "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("compare ")]
    assert lines[-1].startswith("compare 100% step 10/10") and "ETA 0:00" in lines[-1] and "runs done 2/2" in lines[-1]
