"""The serving commands: ``moekit serve-sim`` and the decoding options of ``moekit sample``."""

import json

import pytest
import torch

from moekit.cli.main import main
from moekit.data import get_tokenizer
from moekit.serving.cache import POLICIES
from moekit.serving.decoding import scmoe_generate
from moekit.training import load_run

from .serving_util import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli") / "run")


def test_serve_sim_records_replays_and_reports(run, tmp_path, capsys):
    trace, out = tmp_path / "trace.json", tmp_path / "sim.json"
    assert main(["serve-sim", str(run), "--prompt", "def f", "-n", "6", "--save-trace", str(trace),
                 "--budgets", "100%,25%", "--policies", "lru,belady", "--prefetchers", "none,oracle"]) == 0
    table = capsys.readouterr().out
    assert "6 passes x 3 layers" in table and sum(line.split()[1] == "belady" for line in table.splitlines()[2:]) == 4
    assert main(["serve-sim", str(run), "--trace", str(trace), "--budgets", "25%", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len(POLICIES) * 4  # every policy x prefetcher
    lru = next(r for r in rows if r["policy"] == "lru" and r["prefetcher"] == "none")
    belady = next(r for r in rows if r["policy"] == "belady" and r["prefetcher"] == "none")
    assert belady["hit_rate"] >= lru["hit_rate"]


def test_serve_sim_bad_input_is_one_line_exit_2(run, tmp_path, capsys):
    other = make_run(tmp_path / "other", **{"model.moe.num_experts": 4})
    trace = tmp_path / "t.json"
    assert main(["serve-sim", str(other), "-n", "2", "--save-trace", str(trace), "--budgets", "100%"]) == 0
    capsys.readouterr()
    for argv, message in [(["--trace", str(trace)], "another model"), (["--budgets", "3"], "smaller than one"),
                          (["--policies", "fifo"], "choose from"), (["--trace", str(tmp_path / "no")], "not exist")]:
        assert main(["serve-sim", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_sample_with_scmoe_prints_the_scmoe_tokens(run, capsys):
    assert main(["sample", str(run), "--prompt", "x = ", "-n", "8", "--decoding", "scmoe", "--scmoe-beta", "1",
                 "--device", "cpu"]) == 0
    cfg, model, _ = load_run(run, "cpu")
    tok = get_tokenizer(cfg.data.tokenizer)
    want = scmoe_generate(model, torch.tensor([tok.encode("x = ")]), 8, beta=1.0)[0].tolist()
    assert capsys.readouterr().out == tok.decode(want) + "\n"
    assert main(["sample", str(run), "-n", "4", "--decoding", "rewire", "--rewire-steps", "1"]) == 0
