"""Expert-parallel pieces that need no second process: placements, shard metadata, sharding a model in place,
loading a full checkpoint into a shard, and the messages users see. Collectives are in tests/test_ep.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.dispatch import ExpertShard, resolve_engine
from moekit.parallel import (ParallelGroups, contiguous_placement, init_from_env, is_expert_parameter,
                             load_full_state_dict, make_groups, reduce_gradients, round_robin_placement,
                             shard_experts, sharded_banks)


def _model() -> nn.Module:
    torch.manual_seed(0)
    cfg = MoEConfig(dim=6, hidden_dim=5, num_experts=6, top_k=2, num_shared_experts=1, engine="sorted")
    return nn.Sequential(nn.Linear(6, 6), MoE(cfg, name="a"), MoE(cfg, name="b"))


def _fake_groups(ep_rank: int, ep_size: int = 2) -> ParallelGroups:
    """The groups of one rank, without torch.distributed: enough for sharding, which does no collective."""
    return ParallelGroups(rank=ep_rank, world_size=ep_size, ep_size=ep_size)


def test_placements():
    assert contiguous_placement(6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert round_robin_placement(5, 2) == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="not divisible by ep_size=4"):
        contiguous_placement(6, 4)
    with pytest.raises(ValueError, match="some rank would hold no expert"):
        round_robin_placement(2, 3)


def test_expert_shard_tables_and_validation():
    shard = ExpertShard(group=None, rank_experts=[[0, 3, 4], [1, 2]], rank=1)
    assert (shard.world_size, shard.max_local, shard.num_experts, shard.local_experts) == (2, 3, 5, (1, 2))
    # slot = owner * L + local index
    assert shard.slot_E.tolist() == [0, 3, 4, 1, 2]
    for bad in ([[0, 1], [1, 2]], [[0, 1, 2], []], [[0], [2]]):
        with pytest.raises(ValueError, match="exactly once"):
            ExpertShard(group=None, rank_experts=bad, rank=0)
    with pytest.raises(ValueError, match="would recurse"):
        ExpertShard(group=None, rank_experts=[[0], [1]], rank=0, local_engine="alltoall")


def test_shard_experts_keeps_names_slices_weights_and_leaves_rng_alone():
    full = _model()
    rng = torch.random.get_rng_state()
    model = shard_experts(copy.deepcopy(full), _fake_groups(1), {"1": [[0, 5], [1, 2, 3, 4]]})
    assert torch.equal(rng, torch.random.get_rng_state())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in full.named_parameters()]
    a, b = model[1], model[2]
    assert a.experts.num_experts == 4 and b.experts.num_experts == 3  # planned vs contiguous default
    assert a.config.engine == b.config.engine == "alltoall"
    assert a.experts.expert_shard.local_engine == "sorted"
    torch.testing.assert_close(a.experts.w_gate, full[1].experts.w_gate[[1, 2, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(b.experts.w_down, full[2].experts.w_down[3:], rtol=0, atol=0)
    assert a.experts.w_up.data_ptr() != full[1].experts.w_up.data_ptr()
    assert [n for n, _ in sharded_banks(model)] == ["1.experts", "2.experts"]
    expert = is_expert_parameter(model)
    assert expert["1.experts.w_up"] and not expert["1.router.weight"] and not expert["1.shared_experts.w_up"]
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(model, _fake_groups(1))


def test_shard_experts_rejects_bad_placements():
    with pytest.raises(ValueError, match="3 ranks, expected ep_size=2"):
        shard_experts(_model(), _fake_groups(0), [[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ValueError, match="covers 4 experts, the layer has 6"):
        shard_experts(_model(), _fake_groups(0), [[0, 1], [2, 3]])


def test_load_full_state_dict_into_a_shard_slices_experts():
    full = _model()
    for p in full.parameters():
        p.data.normal_()
    state = full.state_dict()
    model = shard_experts(_model(), _fake_groups(0, ep_size=3))
    load_full_state_dict(model, state)
    torch.testing.assert_close(model[2].experts.w_up, state["2.experts.w_up"][:2], rtol=0, atol=0)
    torch.testing.assert_close(model[0].weight, state["0.weight"], rtol=0, atol=0)
    wrong = dict(state, **{"1.experts.w_up": state["1.experts.w_up"][:4]})
    with pytest.raises(ValueError, match="4 experts in the checkpoint, the model 6"):
        load_full_state_dict(model, wrong)


def test_single_process_defaults_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    groups = init_from_env(1)
    assert (groups.world_size, groups.ep_size, groups.dp_size, groups.is_main) == (1, 1, 1, True)
    model = _model()
    assert shard_experts(model, groups) is model and model[1].config.engine == "sorted"
    model(torch.randn(3, 6)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    reduce_gradients(model, groups)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    with pytest.raises(ValueError, match="needs torch.distributed; launch with torchrun --nproc_per_node=2"):
        make_groups(2)


def test_alltoall_engine_refuses_an_unsharded_bank():
    moe = MoE(MoEConfig(dim=4, hidden_dim=4, num_experts=2, top_k=1))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs a bank sharded by moekit.parallel.shard_experts"):
        resolve_engine("alltoall", x, moe.experts)
    assert resolve_engine("auto", x, moe.experts).name != "alltoall"
