"""Routing analysis: on a model whose routing is fixed by construction, every statistic is known exactly.

The toy model embeds byte tokens one-hot (bytes folded mod 8) and routes token ``t`` to experts
``t // 2`` (first) and ``(t // 2 + 1) % 4`` (second). Padding must not count. The CLI runs end to end on a tiny
patched transformers model and writes its table, JSON and PNGs.

Run: python -m pytest tests/test_analysis.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import moekit
from moekit.analysis import analyze, save_plots, trace_routing


class Toy(nn.Module):
    vocab_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 8, _weight=torch.eye(8))
        cfg = moekit.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, engine="reference")
        self.moe = moekit.MoE(cfg, name="toy.moe")
        with torch.no_grad():
            w = torch.zeros(4, 8)
            for t in range(8):
                w[t // 2, t] = 10.0
                w[(t // 2 + 1) % 4, t] = 5.0
            self.moe.router.weight.copy_(w)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.moe(self.embed(tokens))


def test_statistics_are_exact_on_a_fixed_routing() -> None:
    # "ha ya" -> tokens 0 1 0 1 1 (experts {0,1}); "bb" -> tokens 2 2 (experts {1,2}), padded by 3 in its batch
    report = analyze(Toy(), ["ha ya", "bb"], batch_size=2, min_count=2)
    (layer,) = report.layers
    assert layer.name == "toy.moe" and layer.num_tokens == 7
    torch.testing.assert_close(layer.load_E, torch.tensor([5, 7, 2, 0], dtype=torch.float64) / 14)
    assert layer.dead_experts == [3]
    co = layer.coactivation_EE
    torch.testing.assert_close(co.diag(), torch.tensor([5, 7, 2, 0]) / 7)
    assert co[0, 1] == pytest.approx(5 / 7) and co[1, 2] == pytest.approx(2 / 7) and co[0, 2] == 0
    assert layer.top_tokens[2] == [("<2>", 2, 2)]  # bytes folded mod 8 print as <id>
    assert layer.top_tokens[0] == [("<1>", 3, 3), ("<0>", 2, 2)]  # every occurrence; ties: most frequent first
    assert layer.max_over_mean == pytest.approx(7 / 14 * 4)
    assert "toy.moe" in report.table() and "expert   2" in report.token_table()
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["dead"] == [3]


def test_trace_needs_an_moe_and_removes_its_hooks() -> None:
    with pytest.raises(ValueError, match="no moekit MoE layer"):
        with trace_routing(nn.Linear(2, 2)):
            pass
    model = Toy()
    with trace_routing(model) as trace:
        model(torch.tensor([[0, 2]]))
    model(torch.tensor([[0, 2]]))  # after the with block nothing is recorded
    assert len(trace.ids["toy.moe"]) == 1
    assert trace.ids["toy.moe"][0].tolist() == [[0, 1], [1, 2]]


def test_plots_are_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    report = analyze(Toy(), ["hello analysis", "routing"])
    paths = save_plots(report, tmp_path)
    assert [p.name for p in paths] == ["load.png", "coactivation.png", "entropy.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_cli_on_a_patched_tiny_transformers_model(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from moekit.cli.analyze import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox.\n\nJumps over the lazy dog, twice.\n", encoding="utf-8")
    assert main(["--tiny", "olmoe", "--text", str(text), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    layers = report["layers"]
    assert len(layers) == 4 and all(r["tokens"] == len("The quick brown fox.Jumps over the lazy dog, twice.")
                                    for r in layers)
    assert all(abs(sum(r["load"]) - 1) < 1e-9 for r in layers)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"load.png", "table.txt", "tokens.txt"}
    assert "model.layers.0.mlp" in capsys.readouterr().out


def test_register_adds_the_subcommand() -> None:
    import argparse

    from moekit.cli import analyze as cli

    parser = argparse.ArgumentParser(prog="moekit")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", "--tiny", "mixtral", "--no-plots"])
    assert args.func is cli.run and args.tiny == "mixtral" and args.stdlib == 400


def test_cli_on_a_moekit_run_folder(tmp_path, capsys) -> None:
    from moekit.cli.main import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--no-progress", "--train.max_steps=1",
                 "--train.eval_every", "0"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(run), "--stdlib", "20", "--no-plots", "--out", str(tmp_path / "a")]) == 0
    layers = json.loads((tmp_path / "a" / "report.json").read_text())["layers"]
    assert [r["name"] for r in layers] == ["layers.0.ffn", "layers.1.ffn"]
    # every byte of the 20 sentences is routed, cut at the model's context
    from moekit.analysis import stdlib_sentences
    from moekit.recipes import load_preset

    context = load_preset("tiny").model.context
    assert layers[0]["tokens"] == sum(min(len(s.encode()), context) for s in stdlib_sentences(20))
