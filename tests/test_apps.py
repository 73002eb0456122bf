"""The applications framework (moekit.apps) and `moekit app`: registry, settings, run folder, CLI errors."""

from __future__ import annotations

import json

import pytest

from moekit.apps import get_app, list_apps
from moekit.apps.common import config_from_strings
from moekit.apps.registry import MissingExtra, require
from moekit.cli.main import main
from moekit.configs import ConfigError


def test_list_names_the_apps(capsys):
    assert main(["app", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("driftmoe", "advmoe", "mowst", "adaptdhm", "scaling_mlps", "semm", "vdd", "coe"):
        assert name in out
    assert {a.name for a in list_apps()} >= {"driftmoe"}


def test_unknown_app_one_line_exit_2(capsys, tmp_path):
    assert main(["app", "nosuchapp", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown application 'nosuchapp'" in err[0] and "driftmoe" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("arg,needle", [("--seeds=0", "seeds=0"), ("--bogus=1", "unknown setting --bogus"),
                                        ("--seeds=two", "not a valid int"), ("--streams=sea,moon", "moon")])
def test_bad_values_one_line_exit_2(capsys, tmp_path, arg, needle):
    assert main(["app", "driftmoe", "--out", str(tmp_path / "r"), arg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_missing_extra_names_pip_install(capsys):
    with pytest.raises(MissingExtra, match=r"pip install 'moekit\[apps\]'"):
        require("moekit_no_such_module_xyz")
    require("json")  # present: no error


def test_settings_parse_types():
    spec = get_app("driftmoe")
    cfg = config_from_strings(spec.config_cls, {"streams": "sea,rbf", "lr": "0.01", "baselines": "false"})
    assert cfg.streams == ("sea", "rbf") and cfg.lr == 0.01 and cfg.baselines is False
    with pytest.raises(ConfigError, match="top_k"):
        config_from_strings(spec.config_cls, {"top_k": "13"})


def test_run_folder_written(tmp_path, capsys):
    pytest.importorskip("river")
    out = tmp_path / "run"
    assert main(["app", "driftmoe", "--out", str(out), "--streams=sea", "--num_instances=300", "--seeds=1",
                 "--baselines=false"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["app"] == "driftmoe" and cfg["config"]["num_instances"] == 300
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["learner"] == "driftmoe"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["median_prequential_accuracy"]["sea"]["driftmoe"] == rows[0]["prequential_accuracy"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_app_help_lists_settings(capsys):
    assert main(["app", "adaptdhm", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--num_clusters=3" in out and "--routing_iters=2" in out


def test_no_name_is_a_usage_error(capsys):
    assert main(["app"]) == 2
    assert "moekit app --list" in capsys.readouterr().err


def test_missing_extra_from_the_cli_one_line_exit_2(capsys, tmp_path, monkeypatch):
    import dataclasses

    from moekit.apps import registry
    spec = get_app("adaptdhm")
    monkeypatch.setitem(registry._REGISTRY, "adaptdhm", dataclasses.replace(spec, requires=("no_such_lib_xyz",)))
    assert main(["app", "adaptdhm", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_lib_xyz" in err[0] and "pip install 'moekit[apps]'" in err[0]
    assert not (tmp_path / "r").exists()
