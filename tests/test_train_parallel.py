"""Distributed ``train()`` on the ``tiny`` preset: 2 processes (``moekit.parallel.run_local``, gloo, one thread).

One spawn runs, on both ranks: an expert-parallel run (ep_size=2), the same run stopped half-way and resumed,
and a data-parallel run (ep_size=1). References run here in the parent, single process: with ``grad_accum=2``
a single process sees exactly the two ranks' micro-batches of every step (rank ``r`` draws micro-batch
``r * grad_accum + m``).

Run: ``python -m pytest tests/test_train_parallel.py -q`` (about 15 s on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moekit import MoE, MoEConfig
from moekit.cli.main import main
from moekit.configs import ConfigError, from_dict, to_dict
from moekit.parallel import gather_full_state_dict, init_from_env, make_groups, run_local, shard_experts
from moekit.recipes import load_preset
from moekit.training import evaluate_run, load_run, train, with_overrides
from moekit.training.checkpoint import checkpoint_dir, weights_path
from moekit.training.runs import read_run_config

STEPS, HALF = 6, 3
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", "ckpt", ".lock", "loss.png", "expert_load.png"}


def tiny(**overrides) -> object:
    """The tiny preset, shortened; the aux-loss-free bias on, so its world-summed counts are tested too."""
    base = {"train.max_steps": str(STEPS), "train.eval_every": "0", "train.eval_batches": "1",
            "model.moe.router.bias_update_rate": "0.01"}
    return with_overrides(load_preset("tiny"), {**base, **overrides})


def _curves(result) -> dict:
    return {"losses": result.losses, "norms": [r["grad_norm"] for r in result.records if "grad_norm" in r],
            "summary": result.summary}


def _biased_layer_round_trip() -> float:
    """A layer with per-expert biases, sharded over 2 ranks: the gathered state equals the unsharded one."""
    groups = make_groups(2)
    torch.manual_seed(0)
    layer = MoE(MoEConfig(dim=8, hidden_dim=6, num_experts=4, use_ffn_bias=True))
    with torch.no_grad():
        for b in (layer.experts.b_up, layer.experts.b_gate, layer.experts.b_down):
            b.normal_()
    full = {k: v.clone() for k, v in layer.state_dict().items()}
    gathered = gather_full_state_dict(shard_experts(layer, groups))
    assert set(gathered) == set(full)
    return max((gathered[k] - full[k]).abs().max().item() for k in full)


def _worker(root: str) -> dict:
    # One process group for every run: train() uses it and leaves it (under torchrun, train() creates and
    # destroys its own; re-creating one on the same port in a process can read the previous one's addresses).
    rank = init_from_env(1, timeout=timedelta(seconds=90)).rank
    root = Path(root)
    ep2 = tiny(**{"parallel.ep_size": "2"})
    out = {"whole": _curves(train(ep2, root / "ep2", progress=False))}
    first = train(ep2, root / "split", until_step=HALF, progress=False)
    out["first"] = first.summary["step"]
    if rank == 0:  # keep the step-3 checkpoint for the ep_size=1 resume in the parent
        shutil.copytree(root / "split", root / "half")
    out["resumed"] = _curves(train(ep2, root / "split", resume=True, progress=False))
    out["dp"] = _curves(train(tiny(), root / "dp2", progress=False))
    out["biased layer"] = _biased_layer_round_trip()
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def ranks(root) -> list[dict]:
    return run_local(_worker, 2, str(root), timeout=240)


@pytest.fixture(scope="module")
def reference(root):
    """A single process with grad_accum=2: the union of both ranks' batches, every step."""
    return train(tiny(**{"train.grad_accum": "2"}), root / "ref", progress=False)


def _assert_close(a: list[float], b: list[float], what: str) -> None:
    assert len(a) == len(b), (what, len(a), len(b))
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_ep2_losses_equal_a_single_process_seeing_the_same_global_batches(ranks, reference):
    whole = ranks[0]["whole"]
    assert len(whole["losses"]) == STEPS
    _assert_close(whole["losses"], reference.losses, "loss")
    _assert_close(whole["norms"], [r["grad_norm"] for r in reference.records if "grad_norm" in r], "grad norm")
    assert whole["summary"]["tokens"] == reference.summary["tokens"] == STEPS * 2 * 4 * 32
    assert whole["summary"]["val_loss"] == pytest.approx(reference.summary["val_loss"], rel=1e-5)
    # rank 1 validated the same batches (a collective forward) but logged nothing
    assert ranks[1]["whole"]["summary"]["val_loss"] == whole["summary"]["val_loss"]
    assert ranks[1]["whole"]["losses"] == []


def test_ep2_run_folder_holds_a_full_checkpoint_that_loads_in_one_process(ranks, root, reference):
    out = root / "ep2"
    assert {p.name for p in out.iterdir()} == RUN_FILES  # rank 0 wrote everything, nobody left temporaries
    assert json.loads((out / "config.json").read_text())["parallel"]["ep_size"] == 2
    assert [p.name for p in (out / "ckpt").iterdir()] == [f"step_{STEPS:08d}"]
    with safe_open(str(weights_path(out)), framework="pt") as f:
        assert f.get_slice("layers.0.ffn.experts.w_up").get_shape() == [4, 32, 32]  # all 4 experts
    with safe_open(str(checkpoint_dir(out) / "optimizer.safetensors"), framework="pt") as f:
        assert f.get_slice("adam.layers.1.ffn.experts.w_down.exp_avg").get_shape() == [4, 32, 32]
    cfg, model, state = load_run(out)
    assert state["step"] == STEPS and cfg.parallel.ep_size == 2
    _assert_same_state(model.state_dict(), load_run(reference.out_dir)[1].state_dict())
    assert model.state_dict()["layers.0.ffn.router.expert_bias"].abs().sum() > 0
    assert evaluate_run(out)["val_loss"] == pytest.approx(ranks[0]["whole"]["summary"]["val_loss"], rel=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))


def test_ep2_resume_at_ep2_is_exact(ranks):
    assert ranks[0]["first"] == HALF
    assert ranks[0]["resumed"]["losses"] == ranks[0]["whole"]["losses"]  # the first half from metrics.jsonl
    assert ranks[0]["resumed"]["summary"]["val_loss"] == ranks[0]["whole"]["summary"]["val_loss"]


def test_ep2_checkpoint_resumes_in_one_process(ranks, root, reference):
    """The step-3 checkpoint of the EP run continues at ep_size=1 with grad_accum=2 (the same global batches)."""
    run = root / "half"
    cfg = with_overrides(read_run_config(run), {"parallel.ep_size": "1", "train.grad_accum": "2"})
    resumed = train(cfg, run, resume=True, progress=False)
    _assert_close(resumed.losses, reference.losses, "loss")
    _assert_same_state(load_run(run)[1].state_dict(), load_run(reference.out_dir)[1].state_dict())


def test_data_parallel_run_matches_too(ranks, reference):
    dp = ranks[0]["dp"]
    _assert_close(dp["losses"], reference.losses, "loss")
    _assert_close(dp["norms"], [r["grad_norm"] for r in reference.records if "grad_norm" in r], "grad norm")


def test_sharded_bank_keeps_its_expert_biases(ranks):
    assert all(r["biased layer"] == 0.0 for r in ranks)


def test_sharded_layer_config_stays_valid():
    cfg = MoEConfig(dim=8, hidden_dim=8, num_experts=4)
    assert from_dict(MoEConfig, {**to_dict(cfg), "engine": "alltoall"}).engine == "alltoall"


def test_launch_errors_are_clear(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node=2 -m moekit train"):
        train(tiny(**{"parallel.ep_size": "2"}), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="must divide model.moe.num_experts"):
        tiny(**{"parallel.ep_size": "3"})
    with pytest.raises(ConfigError, match=r"not the 'gmoe' variant.*--parallel.ep_size=1"):
        with_overrides(load_preset("gmoe"), {"parallel.ep_size": "2"})
    for variant in ("topp", "coe", "moepp"):  # route over one expert bank: expert parallelism splits it
        assert with_overrides(load_preset(variant), {"parallel.ep_size": "2"}).parallel.ep_size == 2
    with pytest.raises(ConfigError, match="engine='alltoall' is set by expert parallelism"):
        tiny(**{"model.moe.engine": "alltoall"})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before joining any process group
    with pytest.raises(ConfigError, match=r"ep_size=2 must divide the number of processes \(3\)"):
        train(tiny(**{"parallel.ep_size": "2"}), tmp_path / "b", progress=False)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    code = main(["train", "--preset", "tiny", "--parallel.ep_size=2", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "torchrun --nproc_per_node=2" in err
