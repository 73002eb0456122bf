"""Expert offloading: experts read from the run's safetensors on demand under a byte budget give exactly the
resident model's outputs; budgets are parsed and checked; policies evict as defined."""

import dataclasses
import threading

import pytest
import torch

from moekit.layers import MoE
from moekit.serving import generate, load_offloaded, parse_budget
from moekit.serving.cache import ExpertCache, make_policy
from moekit.training import load_run
from moekit.training.checkpoint import CheckpointError, weights_path

from .serving_util import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("offload") / "run")


def _reference(model):
    for _, ffn in model.sparse_layers():
        ffn.config = dataclasses.replace(ffn.config, engine="reference")
    return model


@pytest.mark.parametrize("budget,policy,prefetch", [("100%", "lru", "none"), ("25%", "lru", "router"),
                                                    ("one", "lfu", "none"), ("12.5%", "activation", "router")])
def test_offloaded_logits_equal_the_resident_model_exactly(run, budget, policy, prefetch):
    _, resident, _ = load_run(run, "cpu")
    _reference(resident)
    if budget == "one":  # exactly one expert resident: every change of expert is a miss
        _, _, off = load_offloaded(run, "100%")
        budget = str(max(off.store.expert_bytes))
        with pytest.raises(ValueError, match="smaller than one expert"):
            load_offloaded(run, str(int(budget) - 1), policy)
    _, model, off = load_offloaded(run, budget, policy, prefetch=prefetch)
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = resident(tokens)
        got, _ = model(tokens)
    assert torch.equal(got, want)
    assert off.cache.used_bytes <= off.cache.capacity_bytes
    if budget != "100%":
        assert off.cache.stats.misses > 0 and len(off.cache.resident) < 18  # the budget forced evictions


def test_offloaded_generation_equals_resident_and_keeps_experts_off_the_model(run):
    _, resident, _ = load_run(run, "cpu")
    _reference(resident)
    _, model, off = load_offloaded(run, "25%", "lru")
    prompt = torch.tensor([[5, 40, 99, 7]])
    assert torch.equal(generate(model, prompt, 20), generate(resident, prompt, 20))
    # no expert weight is a parameter of the offloaded model: only the cache holds experts
    assert not any(".experts." in n for n, _ in model.named_parameters())
    assert sum(len(s) for s in off.trace) > 0  # one entry per layer per forward pass
    assert len(off.trace) == 20 and all(len(step) == 3 for step in off.trace)


def test_full_budget_reaches_100_percent_after_warm_up(run):
    _, model, off = load_offloaded(run, "100%", "lru")
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        model(tokens)
        first_misses = off.cache.stats.misses
        model(tokens)
    assert off.cache.stats.misses == first_misses  # second pass: all hits
    assert first_misses == 18  # 3 layers x 6 experts, each loaded once


def test_budget_parsing_and_bad_budgets():
    assert parse_budget("25%", 1000, 10) == 250
    assert parse_budget("1KiB", 10**6, 10) == 1024 and parse_budget("2MB", 10**9, 10) == 2 * 10**6
    assert parse_budget(500, 1000, 10) == 500
    with pytest.raises(ValueError, match="smaller than one expert"):
        parse_budget("5", 1000, 10)
    with pytest.raises(ValueError, match="not a budget"):
        parse_budget("lots", 1000, 10)


def test_run_without_weights_or_with_another_model_is_a_clear_error(run, tmp_path):
    other = make_run(tmp_path / "other")
    weights_path(other).unlink()
    with pytest.raises(CheckpointError, match="cannot be opened|missing"):
        load_offloaded(other)
    bigger = make_run(tmp_path / "bigger", **{"model.moe.num_experts": 8})
    weights_path(bigger).write_bytes(weights_path(run).read_bytes())  # 6-expert weights, 8-expert config
    with pytest.raises(CheckpointError, match="does not fit|shape"):
        load_offloaded(bigger)


def test_prefetch_never_evicts_the_running_layers_experts():
    loads = []
    cache = ExpertCache(2, make_policy("lru"), lambda k: loads.append(k) or {}, lambda k: 1)
    cache.get((0, 0))
    cache.get((0, 1))
    cache.pinned = {(0, 0), (0, 1)}
    cache.prefetch((1, 3))  # would need to evict a pinned expert: dropped
    assert set(cache.resident) == {(0, 0), (0, 1)} and cache.stats.prefetches == 0
    cache.pinned = set()
    cache.prefetch((1, 3))
    assert (1, 3) in cache.resident and cache.stats.prefetches == 1
    cache.get((1, 3))
    assert cache.stats.prefetch_hits == 1


def test_policies_pick_their_victims():
    def run_policy(name, accesses, **kw):
        cache = ExpertCache(2, make_policy(name, **kw), lambda k: {}, lambda k: 1)
        for k in accesses:
            cache.get(k)
        return set(cache.resident)

    seq = [(0, 0), (0, 0), (0, 1), (0, 2)]  # 0 used twice, then 1, then 2 arrives
    assert run_policy("lru", seq) == {(0, 1), (0, 2)}
    assert run_policy("lfu", seq) == {(0, 0), (0, 2)}
    future = seq + [(0, 0)]
    assert run_policy("belady", future, future=future) == {(0, 0), (0, 2)}
    with pytest.raises(ValueError, match="known future"):
        run_policy("belady", [(0, 1)], future=[(0, 0)])
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo")


def test_offloaded_moe_layers_use_the_offload_engine(run):
    _, model, _ = load_offloaded(run, "50%")
    moes = [f for _, f in model.sparse_layers() if isinstance(f, MoE)]
    assert moes and all(m.config.engine == "offload" for m in moes)


@pytest.mark.parametrize("budget,policy,prefetch", [("25%", "lru", "router"), ("12.5%", "activation", "router"),
                                                    ("50%", "lfu", "router")])
def test_background_prefetch_gives_the_same_bits_and_counts_as_synchronous(run, budget, policy, prefetch):
    """The CPU twin of the CUDA side-stream path: same code, the copies on a worker thread."""
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    prompt = torch.tensor([[5, 40, 99, 7]])
    _, sync_model, sync = load_offloaded(run, budget, policy, prefetch=prefetch)
    _, async_model, off = load_offloaded(run, budget, policy, prefetch=prefetch, asynchronous=True)
    with torch.no_grad():
        want, _ = sync_model(tokens)
        got, _ = async_model(tokens)
    assert torch.equal(got, want)
    assert torch.equal(generate(async_model, prompt, 12), generate(sync_model, prompt, 12))
    a, s = off.cache.stats, sync.cache.stats
    assert (a.hits, a.misses, a.prefetches, a.prefetch_hits, a.bytes_moved) == \
        (s.hits, s.misses, s.prefetches, s.prefetch_hits, s.bytes_moved)
    assert a.prefetches > 0 and off.cache.background is not None
    assert off.cache.background.worker_threads and threading.get_ident() not in off.cache.background.worker_threads
    assert off.cache.used_bytes <= off.cache.capacity_bytes
    off.cache.background.close()


def test_background_prefetch_evicted_before_use_is_dropped_and_reloaded(run):
    _, _, off = load_offloaded(run, "100%", "lru", asynchronous=True)
    cache, size = off.cache, max(off.store.expert_bytes)
    cache.capacity_bytes = size  # room for one expert: a second prefetch evicts the first one while in flight
    cache.prefetch((0, 1))
    cache.prefetch((0, 2))
    assert (0, 1) not in cache.pending and (0, 1) not in cache.resident
    w = cache.get((0, 2))
    assert cache.stats.prefetch_hits == 1 and torch.equal(w["w_up"], off.store.load((0, 2))["w_up"])
    w1 = cache.get((0, 1))  # a demand miss: loaded again inline
    assert cache.stats.misses == 1 and torch.equal(w1["w_up"], off.store.load((0, 1))["w_up"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_prefetch_equals_synchronous(run):
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    _, sync_model, _ = load_offloaded(run, "25%", "lru", prefetch="router", device="cuda")
    _, async_model, off = load_offloaded(run, "25%", "lru", prefetch="router", device="cuda", asynchronous=True)
    assert off.cache.background is not None and off.cache.background.stream is not None
    with torch.no_grad():
        assert torch.equal(async_model(tokens.cuda())[0], sync_model(tokens.cuda())[0])


def _preset_run(path, preset):
    from moekit.configs import to_dict
    from moekit.models import LanguageModel
    from moekit.recipes import load_preset
    from moekit.training import with_overrides
    from moekit.training.checkpoint import CONFIG_FILE, write_checkpoint, write_json

    cfg = with_overrides(load_preset(preset), {"model.dim": 32, "model.num_layers": 3, "model.num_heads": 2,
                                               "model.context": 32})
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    path.mkdir(parents=True)
    write_json(path / CONFIG_FILE, to_dict(cfg))
    write_checkpoint(path, model.state_dict(), {}, {"step": 0})
    return path


@pytest.mark.parametrize("preset", ["topp", "gmoe", "pr-moe", "smoe-dropout", "blockffn"])
def test_variants_wrapping_a_plain_moe_offload_with_the_same_bits(tmp_path, preset):
    run = _preset_run(tmp_path / preset, preset)
    _, resident, _ = load_run(run, "cpu")
    for m in resident.modules():
        if isinstance(m, MoE):
            m.config = dataclasses.replace(m.config, engine="reference")
    _, model, off = load_offloaded(run, "50%", "lru", prefetch="router")
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], resident(tokens)[0])
    assert off.num_layers >= 1 and off.cache.stats.misses > 0
    assert not any(".experts.w_" in n for n, _ in model.named_parameters())


def test_variants_with_their_own_expert_modules_are_refused_with_a_message(tmp_path):
    run = _preset_run(tmp_path / "coe", "coe")
    with pytest.raises(ValueError, match="outside plain MoE layers"):
        load_offloaded(run, "50%")


@pytest.mark.parametrize("policy,prefetch", [("lru", "router"), ("lfu", "router"), ("reuse", "router"),
                                             ("activation", "none")])
def test_live_cache_counts_equal_the_simulator_replaying_its_trace(run, policy, prefetch):
    from moekit.serving.simulate import simulate
    from moekit.serving.trace import trace_of

    _, model, off = load_offloaded(run, "34%", policy, prefetch=prefetch)
    prompt = torch.tensor([[5, 40, 99, 7, 61]])
    generate(model, prompt, 14)
    sim = simulate(trace_of(off), policy, prefetch, off.cache.capacity_bytes)
    s = off.cache.stats
    assert (s.hits, s.misses, s.bytes_moved) == (sim.hits, sim.accesses - sim.hits, sim.bytes_moved)
    assert s.misses > 0 and (prefetch == "none" or s.prefetch_hits > 0)
