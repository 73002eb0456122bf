"""FSDP2 + expert parallelism inside ``train()``: 4 processes (gloo, one thread each) against one process.

One spawn of 4 processes trains the ``tiny`` preset with ``--parallel.fsdp=true`` at ``ep_size`` 1, 2 and 4
for a few steps. The reference is one process with ``grad_accum=4``: exactly the 4 ranks' micro-batches of
every step (rank ``r`` draws micro-batch ``r * grad_accum + m``). Losses, gradient norms and the final
weights (the gathered checkpoint) must agree within float32 tolerance.

Run: ``python -m pytest tests/test_fsdp.py -q``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch

import torch.distributed as dist

from moekit import RouterConfig, RoutingContext, update_expert_biases
from moekit.models import LanguageModel
from moekit.routing import Router
from moekit.parallel import build_mesh, init_from_env, is_fsdp, make_groups, memory_per_rank, run_local
from moekit.recipes import load_preset
from moekit.training import load_run, train, with_overrides
from moekit.training.distributed import Distributed

STEPS, WORLD = 4, 4
EP_SIZES = (1, 2, 4)


def tiny(**overrides):
    base = {"train.max_steps": "8", "train.eval_every": "0", "train.eval_batches": "1",
            "model.moe.router.bias_update_rate": "0.01"}
    return with_overrides(load_preset("tiny"), {**base, **overrides})


def _layout(ep: int) -> dict:
    """What one rank holds after FSDP2 + EP sharding of the tiny model, and the mesh's groups."""
    groups = make_groups(ep)
    torch.manual_seed(0)
    model = LanguageModel(tiny().model)
    full = memory_per_rank(model)["params"]
    Distributed(groups, fsdp=True).shard(model)
    mesh = build_mesh(groups)
    return {"fsdp": is_fsdp(model), "full": full, **memory_per_rank(model),
            "ep ranks": dist.get_process_group_ranks(mesh.get_group("ep")),
            "dp ranks": dist.get_process_group_ranks(mesh.get_group("dp"))}


AUX_T, AUX_D, AUX_E = 6, 5, 4


def _aux_inputs() -> torch.Tensor:
    return torch.randn(WORLD * AUX_T, AUX_D, generator=torch.Generator().manual_seed(3))


def _router(level: str) -> Router:
    torch.manual_seed(0)
    return Router(AUX_D, AUX_E, 2, RouterConfig(aux_loss_coef=1.0, aux_loss_level=level, bias_update_rate=0.1))


def _aux_case(rank: int) -> dict:
    """Each rank routes its own tokens: world means of the loss and of the router gradient, and the bias."""
    out = {}
    for level in ("global_batch", "batch"):
        router = _router(level)
        ctx = RoutingContext()
        router(_aux_inputs()[rank * AUX_T:(rank + 1) * AUX_T], ctx)
        loss = ctx.total_loss()
        loss.backward()
        value = loss.detach().clone()
        for t in (value, router.weight.grad):
            dist.all_reduce(t)
            t /= WORLD
        update_expert_biases(router)
        out[level] = {"loss": value, "grad": router.weight.grad, "bias": router.expert_bias.clone()}
    return out


def _worker(root: str) -> dict:
    groups = init_from_env(1, timeout=timedelta(seconds=120))
    out: dict = {"layout": {ep: _layout(ep) for ep in (1, 2)}, "aux": _aux_case(groups.rank)}
    for ep in EP_SIZES:
        cfg = tiny(**{"parallel.ep_size": str(ep), "parallel.fsdp": "true"})
        result = train(cfg, Path(root) / f"ep{ep}", until_step=STEPS, progress=False)
        out[ep] = {"losses": result.losses,
                   "norms": [r["grad_norm"] for r in result.records if "grad_norm" in r]}
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def ranks(root) -> list[dict]:
    return run_local(_worker, WORLD, str(root), timeout=300)


@pytest.fixture(scope="module")
def reference(root):
    return train(tiny(**{"train.grad_accum": str(WORLD)}), root / "ref", until_step=STEPS, progress=False)


@pytest.mark.parametrize("ep", EP_SIZES)
def test_fsdp_ep_training_equals_one_process(ranks, reference, root, ep):
    got = ranks[0][ep]
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference.losses), rtol=1e-5, atol=1e-5)
    ref_norms = [r["grad_norm"] for r in reference.records if "grad_norm" in r]
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref_norms), rtol=1e-4, atol=1e-5)
    mine, theirs = load_run(root / f"ep{ep}")[1].state_dict(), load_run(reference.out_dir)[1].state_dict()
    assert set(mine) == set(theirs)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert ranks[1][ep]["losses"] == []  # only rank 0 logs


def test_fsdp_shards_non_expert_parameters_and_ep_splits_the_experts(ranks):
    for ep in (1, 2):
        layout = [r["layout"][ep] for r in ranks]
        assert all(lay["fsdp"] for lay in layout)
        full = layout[0]["full"]
        dense = sum(lay["params"] - lay["expert_params"] for lay in layout)  # FSDP shards: disjoint
        experts = sum(lay["expert_params"] for lay in layout) * ep / WORLD  # one copy per EP group
        full_experts = 2 * 3 * 4 * 32 * 32 * 4  # 2 layers x (gate, up, down) x E x F x D x 4 bytes
        # ep=1: the experts are ordinary FSDP parameters; else EP holds them. FSDP pads rows to a multiple of 4.
        sharded = full - full_experts if ep > 1 else full
        assert dense == pytest.approx(sharded, abs=4 * 32 * 4 * WORLD)
        assert experts == (full_experts if ep > 1 else 0)
        assert max(lay["params"] for lay in layout) < full / 2
    assert [r["layout"][2]["ep ranks"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["layout"][2]["dp ranks"] for r in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_global_batch_aux_loss_equals_one_process_on_the_concatenated_batch(ranks):
    router = _router("batch")
    ctx = RoutingContext()
    router(_aux_inputs(), ctx)
    loss = ctx.total_loss()
    loss.backward()
    update_expert_biases(router)
    for r in ranks:
        got = r["aux"]["global_batch"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["grad"], router.weight.grad, rtol=1e-5, atol=1e-7)
        # the aux-loss-free bias counts every rank's tokens: the same on every replica, as in one process
        torch.testing.assert_close(got["bias"], router.expert_bias, rtol=0, atol=0)
    # the per-rank loss is a different objective on these inputs (so the check above can fail)
    assert abs(ranks[0]["aux"]["batch"]["loss"].item() - loss.item()) > 1e-4
    # in one process (no torch.distributed) the global-batch loss is the batch loss
    single = _router("global_batch")
    ctx = RoutingContext()
    single(_aux_inputs(), ctx)
    torch.testing.assert_close(ctx.total_loss(), loss.detach(), rtol=0, atol=0)
