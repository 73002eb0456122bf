"""Expert parallelism on CPU with gloo: the ``alltoall`` engine and EP training equal the single-process model.

Structure: two spawns (2 and 4 processes, via ``moekit.parallel.run_local`` with one thread each) run every
distributed case once and return max differences against a single-process model with the same weights,
computed in the same worker; the tests below assert on those figures. Training references run here, in the
parent, without ``torch.distributed``. Checkpoints travel 2 -> 1 -> 4 through safetensors files.

Run: ``python -m pytest tests/test_ep.py -q`` (about 20 s on 2 cores).
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from moekit import MoE, MoEConfig, RouterConfig, Routing, RoutingContext, update_expert_biases
from moekit.parallel import (all_reduce_mean, broadcast_parameters, clip_grad_norm_, gather_full_optimizer_state,
                             gather_full_state_dict, init_from_env, is_expert_parameter, load_full_optimizer_state,
                             load_full_state_dict, make_groups, plan_placement, record_routing, reduce_gradients,
                             run_local, shard_experts)

D, F, TOL = 10, 14, 2e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def _sum_over_world(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


# ---------------------------------------------------------------- layer cases (run in every process)

def _layer_case(groups, *, num_experts, tokens_per_rank, placement=None, activation="swiglu",
                engine="auto", routing_fn=None, no_grad=False, x_grad=True) -> dict[str, float]:
    """One MoE layer, EP vs single process, same weights; returns max abs differences by quantity."""
    W, rank = groups.world_size, groups.rank
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=num_experts, top_k=3, activation=activation,
                    num_shared_experts=1, engine=engine)
    ref = MoE(cfg)
    ep = shard_experts(copy.deepcopy(ref), groups, placement)
    counts = [tokens_per_rank(r) for r in range(W)]
    x_all = torch.randn(sum(counts), D, requires_grad=x_grad)
    g_all = torch.randn(sum(counts), D)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    x = x_all.detach()[lo:hi].clone().requires_grad_(x_grad)
    out = {}
    with torch.set_grad_enabled(not no_grad):
        if routing_fn is None:
            y_ref, y = ref(x_all), ep(x)
        else:
            ids_TK, w_TK = routing_fn(sum(counts), num_experts, W)
            w_ref, w = w_TK.clone().requires_grad_(), w_TK[lo:hi].clone().requires_grad_()
            dummy = torch.zeros(sum(counts), num_experts)
            y_ref = ref.combine(x_all, Routing(ids_TK, w_ref, dummy, dummy))
            y = ep.combine(x, Routing(ids_TK[lo:hi], w, dummy[lo:hi], dummy[lo:hi]))
    out["y"] = _max_diff(y, y_ref[lo:hi])
    if no_grad:
        return out
    (y_ref * g_all).sum().backward()
    (y * g_all[lo:hi]).sum().backward()
    if x_grad:
        out["x.grad"] = _max_diff(x.grad, x_all.grad[lo:hi])
    if routing_fn is not None:
        out["weights.grad"] = _max_diff(w.grad, w_ref.grad[lo:hi])
    local = list(ep.experts.expert_shard.local_experts)
    for name, p in ep.named_parameters():
        p_ref = ref.get_parameter(name)
        if p_ref.grad is None:  # the router, when the routing is given
            assert p.grad is None, name
            continue
        if name.startswith("experts."):  # one copy per expert: its gradient is already the full one
            # A rank that received no token has no expert gradient (reduce_gradients makes it zero).
            out[name] = _max_diff(torch.zeros_like(p) if p.grad is None else p.grad, p_ref.grad[local])
            out[name + " (weights)"] = _max_diff(p, p_ref[local])
        else:  # replicated: each rank holds its own tokens' share
            out[name] = _max_diff(_sum_over_world(p.grad), p_ref.grad)
    return out


def _avoid_last_rank(T: int, E: int, W: int):
    """Routing that never picks the experts of the last rank (contiguous placement), with empty slots."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, E - E // W, (T, 3), generator=g)
    ids[::4, 2] = -1
    w = torch.rand(T, 3, generator=g) * (ids >= 0)
    return ids, w


def _planned_case(groups) -> dict[str, float]:
    """A 2-layer model sharded by a placement plan (different per layer): same outputs and gradients, and
    each rank's measured load equals the plan's prediction on the profiled batch."""
    W, rank = groups.world_size, groups.rank
    ref = _Stack()
    x_all = torch.randn(W * 6, 6, generator=torch.Generator().manual_seed(5))
    with record_routing(ref) as profile:  # each rank profiles its own tokens, then the profiles are summed
        ref(x_all[rank * 6:(rank + 1) * 6])
    profile.all_reduce(groups)
    with record_routing(ref) as whole:
        ref(x_all)
    plan = plan_placement(profile, W)
    ep = shard_experts(copy.deepcopy(ref), groups, plan.as_dict())
    x_all.requires_grad_()
    x = x_all.detach()[rank * 6:(rank + 1) * 6].clone().requires_grad_()
    ref(x_all).sum().backward()
    y = ep(x)
    y.sum().backward()
    out = {"y": _max_diff(y, ref(x_all)[rank * 6:(rank + 1) * 6]),
           "x.grad": _max_diff(x.grad, x_all.grad[rank * 6:(rank + 1) * 6]),
           "inp.weight": _max_diff(_sum_over_world(ep.inp.weight.grad), ref.inp.weight.grad),
           "summed profile": max(_max_diff(profile.loads_LE, whole.loads_LE),
                                 _max_diff(profile.transitions_LEE, whole.transitions_LEE))}
    # the plan (MoETuner's ILP with scipy installed) physically moves experts away from the contiguous layout
    contiguous = [list(range(r * len(p[0]), (r + 1) * len(p[0]))) for p in plan.placements[:1] for r in range(W)]
    out["experts not moved (1 = yes)"] = float(all([list(r) for r in p] == contiguous for p in plan.placements))
    rank_LE = plan.rank_of_LE()
    for l, moe in enumerate(ep.moes):
        predicted = profile.loads_LE[l][rank_LE[l] == groups.ep_rank].sum()
        measured = moe.experts.expert_shard.received_L.sum()
        out[f"layer {l} measured - predicted load"] = abs(measured - predicted).item()
        out[f"layer {l} experts.w_down"] = _max_diff(
            moe.experts.w_down.grad, ref.moes[l].experts.w_down.grad[list(plan.placements[l][groups.ep_rank])])
    return out


def _engine_cases(ep_size: int) -> dict[str, dict[str, float]]:
    groups = init_from_env(ep_size, timeout=timedelta(seconds=60))
    W = groups.world_size
    E = 2 * W
    uneven = {2: [[0, 3, 4], [1, 2]], 4: [[0, 5], [1], [2, 4], [3]]}[W]
    return {
        "uneven tokens": _layer_case(groups, num_experts=E, tokens_per_rank=lambda r: 5 + 2 * r),
        "rank 1 has no tokens": _layer_case(groups, num_experts=E, tokens_per_rank=lambda r: 0 if r == 1 else 9),
        "last rank receives nothing": _layer_case(groups, num_experts=E, tokens_per_rank=lambda r: 6,
                                                  routing_fn=_avoid_last_rank),
        "uneven placement, reference engine, gelu": _layer_case(
            groups, num_experts=len(sum(uneven, [])), tokens_per_rank=lambda r: 7, placement=uneven,
            activation="gelu", engine="reference"),
        "input without grad, last rank receives nothing": _layer_case(
            groups, num_experts=E, tokens_per_rank=lambda r: 5, routing_fn=_avoid_last_rank, x_grad=False),
        "no_grad": _layer_case(groups, num_experts=E, tokens_per_rank=lambda r: 4 + r, no_grad=True),
        "planned placement per layer": _planned_case(groups),
    }


# ---------------------------------------------------------------- training (EP worker and reference)

B, STEPS, CLIP = 8, 20, 0.5


class _Stack(nn.Module):
    """A tiny regression model: Linear -> 2 residual MoE layers -> Linear. Layer 0 uses the Switch aux loss
    and z-loss, layer 1 the auxiliary-loss-free bias (sigmoid scores)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        r0 = RouterConfig(aux_loss_coef=0.05, z_loss_coef=1e-3)
        r1 = RouterConfig(score_func="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-2)
        self.inp = nn.Linear(6, D)
        self.moes = nn.ModuleList([MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=8, top_k=2, router=r),
                                       name=f"moe{i}") for i, r in enumerate((r0, r1))])
        self.out = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h, ctx)
        return self.out(h)


def _batch(step: int, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(num_chunks * B, 6, generator=g)
    return x, x[:, :1].sin() + 0.1 * torch.randn(num_chunks * B, 1, generator=g)


def _loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ctx = RoutingContext()
    return nn.functional.mse_loss(model(x, ctx), t) + ctx.total_loss()


def _train(model, opt, steps: range, num_chunks: int, chunk: int | None, groups=None) -> dict[str, list[float]]:
    """``chunk=None``: the single-process reference, the mean of every chunk's loss (as gradient averaging
    over ranks computes); else this rank's chunk only, gradients reduced over ``groups``. Gradients are
    clipped to the whole model's norm ``CLIP``. Returns the losses and the norms before clipping."""
    losses, norms = [], []
    for step in steps:
        x, t = _batch(step, num_chunks)
        if chunk is None:
            loss = torch.stack([_loss(model, x[c * B:(c + 1) * B], t[c * B:(c + 1) * B])
                                for c in range(num_chunks)]).mean()
            loss.backward()
            norms.append(nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
            losses.append(loss.item())
        else:
            loss = _loss(model, x[chunk * B:(chunk + 1) * B], t[chunk * B:(chunk + 1) * B])
            loss.backward()
            reduce_gradients(model, groups)
            norms.append(clip_grad_norm_(model, CLIP, groups).item())
            losses.append(all_reduce_mean(loss, groups))
        opt.step()
        opt.zero_grad()
        update_expert_biases(model)  # distributed: pending counts summed over the world
    return {"losses": losses, "norms": norms}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _ep_train(groups, ckpt: str | None) -> dict:
    model = shard_experts(_Stack(), groups)
    opt = _optimizer(model)
    curves = _train(model, opt, range(STEPS), groups.world_size, groups.rank, groups)
    state, opt_state = gather_full_state_dict(model), gather_full_optimizer_state(model, opt)
    if ckpt and groups.is_main:
        save_file({k: v.contiguous() for k, v in state.items()}, ckpt + ".safetensors")
        torch.save(opt_state, ckpt + ".optim.pt")
    return curves


def _ep_resume(groups, ckpt: str, steps: range) -> dict:
    """Load a full checkpoint into this layout and train on: losses and the final full state."""
    model = shard_experts(_Stack(), groups)
    load_full_state_dict(model, load_file(ckpt + ".safetensors"))
    opt = _optimizer(model)
    load_full_optimizer_state(model, opt, torch.load(ckpt + ".optim.pt", weights_only=True))
    curves = _train(model, opt, steps, groups.world_size, groups.rank, groups)
    return {**curves, "state": gather_full_state_dict(model)}


def _broadcast_case(groups) -> float:
    """Every copy differs (+rank); after broadcast_parameters replicated tensors equal rank 0's and each
    expert shard equals its first replica's (global rank = ep_rank). Returns the max deviation."""
    model = shard_experts(_Stack(), groups)
    expert = is_expert_parameter(model)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.data += groups.rank
    broadcast_parameters(model, groups)
    return max(_max_diff(p, originals[n] + (groups.ep_rank if expert[n] else 0))
               for n, p in model.named_parameters())


def _worker(ep_size: int, train_ep: int, ckpt_out: str | None, resume: str | None) -> dict:
    result = {"engine": _engine_cases(ep_size)}
    result["broadcast"] = _broadcast_case(make_groups(train_ep))
    result["train"] = _ep_train(make_groups(train_ep), ckpt_out)
    if resume:
        result["resume"] = _ep_resume(make_groups(ep_size), resume, range(STEPS, STEPS + 3))
    return result


def _reference(num_chunks: int) -> tuple[_Stack, torch.optim.Optimizer, dict[str, list[float]]]:
    model = _Stack()
    opt = _optimizer(model)
    return model, opt, _train(model, opt, range(STEPS), num_chunks, None)


# ---------------------------------------------------------------- fixtures: one spawn per world size

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ep")


@pytest.fixture(scope="module")
def two(workdir):
    return run_local(_worker, 2, 2, 2, str(workdir / "ep2"), None, timeout=120)


@pytest.fixture(scope="module")
def ckpt_from_one(two, workdir):
    """2 -> 1: the EP-2 checkpoint loaded into the single-process model, then saved again by it."""
    model = _Stack()
    load_full_state_dict(model, load_file(str(workdir / "ep2.safetensors")))
    opt = _optimizer(model)
    load_full_optimizer_state(model, opt, torch.load(str(workdir / "ep2.optim.pt"), weights_only=True))
    path = str(workdir / "one")
    save_file(gather_full_state_dict(model), path + ".safetensors")
    torch.save(gather_full_optimizer_state(model, opt), path + ".optim.pt")
    return model, opt, path


@pytest.fixture(scope="module")
def four(ckpt_from_one):
    return run_local(_worker, 4, 4, 2, None, ckpt_from_one[2], timeout=180)


@pytest.fixture(scope="module")
def ref2():
    return _reference(2)


CASES = ["uneven tokens", "rank 1 has no tokens", "last rank receives nothing",
         "input without grad, last rank receives nothing", "uneven placement, reference engine, gelu", "no_grad",
         "planned placement per layer"]


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("world", ["two", "four"])
@pytest.mark.parametrize("case", CASES)
def test_layer_output_and_every_gradient_match_single_process(world, case, request):
    for rank, result in enumerate(request.getfixturevalue(world)):
        diffs = result["engine"][case]
        assert diffs["y"] <= TOL, f"rank {rank}: output differs by {diffs['y']:.3g}"
        if case not in ("no_grad", "planned placement per layer"):
            # gradients of x, the router (or the given weights), shared experts and every expert weight
            given_routing = "last rank receives nothing" in case
            expected = {"weights.grad" if given_routing else "router.weight", "experts.w_up", "experts.w_down",
                        "shared_experts.w_up"} | ({"x.grad"} if "without grad" not in case else set())
            assert expected <= set(diffs)
        bad = {k: v for k, v in diffs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("world", ["two", "four"])
def test_broadcast_parameters_syncs_replicated_and_expert_copies(world, request):
    assert all(result["broadcast"] == 0.0 for result in request.getfixturevalue(world))


def _assert_same_curves(results: list[dict], ref: dict[str, list[float]]) -> None:
    for rank, curves in enumerate(results):
        for name in ("losses", "norms"):
            torch.testing.assert_close(torch.tensor(curves[name]), torch.tensor(ref[name]), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {name}: {m}")


def test_twenty_step_training_matches_single_process_ep2(two, ref2):
    """Losses and gradient norms (before clipping) of every step equal the single process's."""
    ref = ref2[2]
    _assert_same_curves([result["train"] for result in two], ref)
    assert ref["losses"][-1] < 0.7 * ref["losses"][0], "the run should learn, or equality proves little"
    assert sum(n > CLIP for n in ref["norms"]) >= 5, "clipping should be active, or its test proves little"


def test_twenty_step_training_matches_single_process_ep2_dp2(four):
    """4 ranks, ep_size=2: expert gradients reduced over replicas [0 2] and [1 3] only."""
    _assert_same_curves([result["train"] for result in four], _reference(4)[2])


def test_reshard_2_to_1_checkpoint_equals_single_process_training(ckpt_from_one, ref2):
    """The EP-2 full checkpoint (weights, expert biases, AdamW moments) equals single-process training."""
    model, opt, _ = ckpt_from_one
    ref_model, ref_opt, _ = ref2
    ref_state = ref_model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert ref_state["moes.1.router.expert_bias"].abs().sum() > 0, "the aux-free bias should have moved"
    ref_moments = ref_opt.state_dict()["state"]
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, ref_moments[i][k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{i}.{k}: {m}")


def test_reshard_1_to_4_resumes_training_exactly(four, ckpt_from_one):
    """The single-process checkpoint loaded at ep_size=4 resumes: 3 more steps equal the single process's."""
    model, opt = copy.deepcopy(ckpt_from_one[:2])
    ref = _train(model, opt, range(STEPS, STEPS + 3), 4, None)
    _assert_same_curves([result["resume"] for result in four], ref)
    ref_state = model.state_dict()
    for rank, result in enumerate(four):
        for key, value in result["resume"]["state"].items():
            torch.testing.assert_close(value, ref_state[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
