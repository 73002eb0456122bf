"""Expert parallelism with the ranks as threads of one process.

An in-memory ``all_to_all_single`` (each thread is one rank; calls on a group meet at a barrier) stands in for
``torch.distributed``, so the ``alltoall`` engine's and the hierarchical exchange's arithmetic (sorting by owner,
split sizes, received rows, combine at home, the backward exchange) are checked in a second, in one process,
where mutation testing also sees them (it cannot see child processes). ``tests/test_ep.py`` and
``tests/test_hierarchical.py`` check the same against real gloo collectives.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig, Routing
from moekit.dispatch import ExpertShard, get_engine, resolve_engine
from moekit.dispatch.hierarchical import Hierarchy, hierarchical_all_to_all
from moekit.parallel import ParallelGroups, shard_experts

D, F = 6, 5


class _Group:
    """A fake process group: the global ranks it holds, in group order."""

    def __init__(self, ranks: tuple[int, ...]):
        self.ranks = ranks


class _ThreadWorld:
    """``all_to_all_single`` among ``W`` threads; the k-th call of each member of a group exchanges together."""

    def __init__(self, W: int, delay: float = 0.0):
        self.W, self.local, self.lock, self.delay = W, threading.local(), threading.Lock(), delay
        self.mail: dict = {}
        self.barriers: dict[tuple[int, ...], threading.Barrier] = {}
        self.calls: dict[tuple[int, tuple[int, ...]], int] = {}
        self.num_calls = 0

    def _barrier(self, ranks: tuple[int, ...]) -> threading.Barrier:
        with self.lock:
            return self.barriers.setdefault(ranks, threading.Barrier(len(ranks), timeout=60))

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        ranks = tuple(range(self.W)) if group is None else group.ranks
        me, n = ranks.index(self.local.rank), len(ranks)
        ins = list(input_split_sizes) if input_split_sizes else [input.shape[0] // n] * n
        outs = list(output_split_sizes) if output_split_sizes else [output.shape[0] // n] * n
        assert sum(ins) == input.shape[0] and sum(outs) == output.shape[0] and len(ins) == len(outs) == n
        with self.lock:
            seq = self.calls.get((me, ranks), 0)
            self.calls[(me, ranks)] = seq + 1
            self.num_calls += 1
            self.mail[(ranks, seq, me)] = [c.clone() for c in torch.split(input, ins)]
        time.sleep(self.delay)  # a slow link: every exchange takes at least this long on every rank
        self._barrier(ranks).wait()
        got = [self.mail[(ranks, seq, src)][me] for src in range(n)]
        assert [c.shape[0] for c in got] == outs, (got, outs)  # the sender's splits match the receiver's
        if output.numel():
            output.copy_(torch.cat(got))
        self._barrier(ranks).wait()

    def run(self, fn: Callable[[int], dict], monkeypatch) -> list[dict]:
        monkeypatch.setattr(dist, "all_to_all_single", self.all_to_all_single)
        results: list = [None] * self.W
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised below; free the other threads
                errors.append(e)
                for b in list(self.barriers.values()):
                    b.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.W)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _layer_case(monkeypatch, *, W: int, E: int, counts: list[int], placement, local_engine: str = "sorted",
                routing_fn=None, hierarchy_node: int | None = None, grad: bool = True, replicas: int = 1,
                delay: float = 0.0):
    """EP layer on ``W`` thread-ranks vs the single-process layer on all tokens: per rank, the differences."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=3, num_shared_experts=1, engine="reference")
    ref = MoE(cfg)
    T = sum(counts)
    x_all = torch.randn(T, D, requires_grad=True)
    g_all = torch.randn(T, D)
    dummy = torch.zeros(T, E)
    if routing_fn is not None:
        ids_TK, w_TK = routing_fn(T, E)
        w_ref = w_TK.clone().requires_grad_()
        y_ref = ref.combine(x_all, Routing(ids_TK, w_ref, dummy, dummy))
    else:
        y_ref = ref(x_all)
    (y_ref * g_all).sum().backward()
    world = _ThreadWorld(W * replicas, delay)  # replicas > 1: DP copies of the EP group, each with its own group
    hier = None
    if hierarchy_node is not None:
        G, M = hierarchy_node, W // hierarchy_node
        hier = [Hierarchy(intra=_Group(tuple(range((r // G) * G, (r // G) * G + G))),
                          inter=_Group(tuple(range(r % G, W, G))), node_size=G) for r in range(W)]
    eps = []
    for r in range(W):
        ep = shard_experts(copy.deepcopy(ref), ParallelGroups(rank=r, world_size=W, ep_size=W), placement,
                           hier[r] if hier else None)
        ep.zero_grad(set_to_none=True)
        shard = ep.experts.expert_shard
        eps.append(ep)
        assert shard.local_engine == "reference"  # the layer's own engine runs the local rows
        ep.experts.expert_shard = ExpertShard(group=None, rank_experts=shard.rank_experts, rank=r,
                                              local_engine=local_engine, hierarchy=shard.hierarchy)
        assert ep.experts.expert_shard.received_L.dtype == torch.int64

    if replicas > 1:  # DP copies of the EP group: thread i is EP rank i % W of group i // W
        eps = [copy.deepcopy(ep) for _ in range(replicas) for ep in eps]
        for i, ep in enumerate(eps):
            ep.experts.expert_shard.group = _Group(tuple(range(i // W * W, i // W * W + W)))

    def rank_fn(i: int) -> dict:
        ep, r = eps[i], i % W
        lo, hi = sum(counts[:r]), sum(counts[:r + 1])
        x = x_all.detach()[lo:hi].clone().requires_grad_()
        with torch.set_grad_enabled(grad):
            if routing_fn is None:
                y = ep(x)
            else:
                w = w_TK[lo:hi].clone().requires_grad_()
                y = ep.combine(x, Routing(ids_TK[lo:hi], w, dummy[lo:hi], dummy[lo:hi]))
        out = {"y": _diff(y, y_ref[lo:hi])}
        if grad:
            (y * g_all[lo:hi]).sum().backward()
            out["x.grad"] = _diff(x.grad, x_all.grad[lo:hi])
            if routing_fn is not None:
                out["weights.grad"] = _diff(w.grad, w_ref.grad[lo:hi])
        return out

    results = world.run(rank_fn, monkeypatch)
    if grad and replicas == 1:  # expert gradients: each expert lives on one rank, which gets every rank's contribution
        for r, ep in enumerate(eps):
            local = list(ep.experts.expert_shard.local_experts)
            for name in ("w_gate", "w_up", "w_down"):
                p = getattr(ep.experts, name)
                g = torch.zeros_like(p) if p.grad is None else p.grad
                results[r]["experts." + name] = _diff(g, getattr(ref.experts, name).grad[local])
        for name, p_ref in ref.named_parameters():  # replicated: the ranks' shares sum to the whole
            if name.startswith("experts.") or p_ref.grad is None:
                continue
            total = sum(eps[r].get_parameter(name).grad for r in range(W))
            results[0][name + " (summed)"] = _diff(total, p_ref.grad)
    return results, eps, world, ref, x_all


def _assert_close(results: list[dict], tol: float = 2e-5) -> None:
    for r, res in enumerate(results):
        bad = {k: v for k, v in res.items() if not v <= tol}
        assert not bad, f"rank {r}: {bad}"


@pytest.mark.parametrize("local_engine", ["sorted", "reference"])
def test_alltoall_equals_single_process_on_outputs_and_every_gradient(monkeypatch, local_engine):
    # uneven placement (ranks hold 2, 3 and 2 experts), a rank with no tokens, odd token counts
    placement = [[0, 4], [1, 2, 5], [3, 6]]
    results, eps, world, ref, x_all = _layer_case(monkeypatch, W=3, E=7, counts=[5, 0, 4], placement=placement,
                                                  local_engine=local_engine)
    _assert_close(results)
    # measured load: rows received per local expert = the single-process routing's count of that expert
    counts_E = torch.bincount(ref.router(x_all).expert_ids_TK.flatten().clamp_min(0), minlength=7)
    for ep, experts in zip(eps, placement):
        shard = ep.experts.expert_shard
        assert shard.received_L.tolist() == counts_E[experts].tolist()
        assert shard.comm_seconds > 0.0
        shard.reset_stats()
        assert shard.received_L.tolist() == [0] * len(experts) and shard.comm_seconds == 0.0
    # every rank takes part in every exchange: counts, tokens, outputs; and the two backward exchanges
    assert world.num_calls == 3 * 5


def _avoid_last_rank(T: int, E: int):
    """Routing that never picks the last rank's experts (it receives no row), with empty slots."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, E - 2, (T, 3), generator=g)
    ids[::3, 1] = -1
    ids[1::4, 2] = -1
    return ids, torch.rand(T, 3, generator=g) * (ids >= 0)


def test_alltoall_with_empty_slots_and_an_idle_rank_matches_including_weight_gradients(monkeypatch):
    results, eps, *_ = _layer_case(monkeypatch, W=3, E=6, counts=[4, 7, 1], placement=None,
                                   routing_fn=_avoid_last_rank)
    _assert_close(results)
    assert eps[2].experts.expert_shard.received_L.tolist() == [0, 0]  # contiguous: rank 2 holds 4, 5
    assert eps[2].experts.w_up.grad is None or eps[2].experts.w_up.grad.abs().max() == 0


def test_alltoall_without_grad_runs_forward_only(monkeypatch):
    results, *_ = _layer_case(monkeypatch, W=2, E=4, counts=[3, 5], placement=[[0, 1, 3], [2]], grad=False)
    _assert_close(results)


def test_alltoall_exchanges_within_its_expert_parallel_group_only(monkeypatch):
    # 4 thread-ranks = 2 DP copies of an EP group of 2: each copy's exchange stays inside its group
    results, eps, world, *_ = _layer_case(monkeypatch, W=2, E=4, counts=[3, 5], placement=[[0, 1, 3], [2]],
                                          replicas=2)
    _assert_close(results)
    assert len(results) == 4 and {ranks for ranks in world.barriers} == {(0, 1), (2, 3)}


def test_alltoall_with_the_auto_local_engine_and_time_accounting(monkeypatch):
    start = time.perf_counter()
    results, eps, *_ = _layer_case(monkeypatch, W=2, E=4, counts=[4, 2], placement=[[0, 2], [1, 3]],
                                   local_engine="auto")
    wall = time.perf_counter() - start
    _assert_close(results)
    for ep in eps:  # host time in the exchanges: positive, and within the test's own wall time
        assert 0.0 < ep.experts.expert_shard.comm_seconds < wall


def test_expert_shard_rejects_a_rank_outside_the_group():
    for rank in (2, -1):
        with pytest.raises(ValueError, match=rf"^rank={rank} is not a rank of the group: rank_experts lists 2 ranks "
                                             r"\(0\.\.1\); give this process's rank within the expert-parallel group$"):
            ExpertShard(group=None, rank_experts=[[0], [1]], rank=rank)
    assert ExpertShard(group=None, rank_experts=[[0], [1]], rank=1).local_experts == (1,)


def test_hierarchical_exchange_layer_equals_single_process(monkeypatch):
    # 4 ranks as 2 nodes of 2: same result as the flat exchange, outputs and gradients
    results, *_ = _layer_case(monkeypatch, W=4, E=8, counts=[3, 0, 5, 2], placement=[[0, 7], [1, 2, 3], [4], [5, 6]],
                              hierarchy_node=2)
    _assert_close(results)


def test_hierarchical_all_to_all_matches_the_flat_exchange_row_for_row(monkeypatch):
    W, G = 6, 3  # 2 nodes of 3 ranks; uneven and empty splits
    g = torch.Generator().manual_seed(3)
    send_WW = torch.randint(0, 3, (W, W), generator=g)  # send_WW[src, dst] rows
    send_WW[1] = 0
    send_WW[:, 4] = 0
    rows = [torch.arange(int(send_WW[r].sum()), dtype=torch.float32)[:, None] + 100 * r for r in range(W)]
    expected = [torch.cat([rows[src][int(send_WW[src, :dst].sum()):int(send_WW[src, :dst + 1].sum())]
                           for src in range(W)]) for dst in range(W)]
    world = _ThreadWorld(W)

    def rank_fn(r: int) -> dict:
        hier = Hierarchy(intra=_Group(tuple(range((r // G) * G, (r // G) * G + G))),
                         inter=_Group(tuple(range(r % G, W, G))), node_size=G)
        out = hierarchical_all_to_all(rows[r], send_WW[:, r].tolist(), send_WW[r].tolist(), hier)
        return {"rows": _diff(out, expected[r])}

    _assert_close(world.run(rank_fn, monkeypatch), tol=0.0)


def test_engine_errors_name_the_problem_and_the_fix():
    moe = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=4, top_k=2))
    x = torch.randn(3, D)
    with pytest.raises(ValueError, match=r"unknown engine 'sortd'; did you mean 'sorted'\?; available: \[.*'sorted'"):
        get_engine("sortd")
    with pytest.raises(ValueError, match=r"unknown engine 'zzz'; available") as err:
        get_engine("zzz")
    assert "did you mean" not in str(err.value)
    with pytest.raises(ValueError, match=r"engine 'alltoall' cannot run here: the alltoall engine needs a bank "
                                         r"sharded by moekit.parallel.shard_experts; use engine='auto'"):
        resolve_engine("alltoall", x, moe.experts)
    with pytest.raises(ValueError) as err:
        resolve_engine("grouped_mm", x, moe.experts)
    assert str(err.value) == ("engine 'grouped_mm' cannot run here: grouped_mm is a loop of matmuls on CPU (no "
                              "faster); it is chosen automatically only on CUDA; use engine='auto' or 'reference'")
    assert resolve_engine("auto", x, moe.experts).name != "alltoall"  # auto skips what cannot run
    with pytest.raises(ValueError) as err:
        ExpertShard(group=None, rank_experts=[[0], [1]], rank=0, local_engine="alltoall")
    assert str(err.value) == "local_engine='alltoall' would recurse; use 'auto', 'sorted' or 'reference'"


def test_comm_seconds_accumulates_every_exchange_of_a_step(monkeypatch):
    # each exchange takes >= delay on every rank: counts, tokens and outputs forward, two exchanges backward
    delay = 0.05
    results, eps, *_ = _layer_case(monkeypatch, W=2, E=4, counts=[3, 4], placement=[[0, 1], [2, 3]],
                                   local_engine="reference", delay=delay)
    _assert_close(results)
    for ep in eps:
        assert ep.experts.expert_shard.comm_seconds >= 5 * delay


def test_bfloat16_rows_reach_float32_experts_and_come_back_in_bfloat16(monkeypatch):
    # FSDP2 mixed precision: the rows arrive in bfloat16, the experts stay float32
    from moekit.dispatch import alltoall_engine, reference_engine
    torch.manual_seed(0)
    W, E, counts = 2, 4, [5, 3]
    ref = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=2, engine="reference"))
    x_all = torch.randn(sum(counts), D).to(torch.bfloat16)
    routing = ref.route(x_all.float())
    with torch.no_grad():
        y_ref = reference_engine(x_all.float(), routing, ref.experts)
    eps = [shard_experts(copy.deepcopy(ref), ParallelGroups(rank=r, world_size=W, ep_size=W)) for r in range(W)]

    def rank_fn(r: int) -> dict:
        lo, hi = sum(counts[:r]), sum(counts[:r + 1])
        part = Routing(routing.expert_ids_TK[lo:hi], routing.weights_TK[lo:hi], routing.scores_TE[lo:hi],
                       routing.logits_TE[lo:hi])
        with torch.no_grad():
            y = alltoall_engine(x_all[lo:hi], part, eps[r].experts)
        assert y.dtype == torch.bfloat16
        return {"y": _diff(y.float(), y_ref[lo:hi])}

    _assert_close(_ThreadWorld(W).run(rank_fn, monkeypatch), tol=0.05 * float(y_ref.abs().max()))


def test_auto_local_engine_is_chosen_for_the_local_bank(monkeypatch):
    # ``auto`` must ask each engine's ``supports`` about the bank the rows will run on (the local shard)
    from moekit.dispatch import reference_engine, registry
    monkeypatch.setattr(registry, "ENGINES", dict(registry.ENGINES))
    ran: list[int] = []

    def sharded_only(x_TD, bank):
        return None if getattr(bank, "expert_shard", None) is not None else "needs the local shard"

    @registry.register_engine("test_shard_local", priority=1000, supports=sharded_only)
    def recording(x_TD, routing, bank):
        ran.append(x_TD.shape[0])
        return reference_engine(x_TD, routing, bank)

    results, *_ = _layer_case(monkeypatch, W=2, E=4, counts=[4, 3], placement=[[0, 2], [1, 3]],
                              local_engine="auto")
    _assert_close(results)
    assert len(ran) == 2 and sum(ran) > 0  # one local run per rank, on the received rows
