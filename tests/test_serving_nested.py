"""Bit-nested offloading (D²MoE §7): HEBF order, the memory-budget scheduler, low-bit misses, exactness against the
resident compressed model at every precision."""

import copy
import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.compression import compress
from moekit.models import LanguageModel, ModelConfig
from moekit.serving import generate
from moekit.serving.nested import hebf_order, offload_nested


def _compressed(seed=0, levels=2, activation="swiglu", num_experts=6, bias=False):
    torch.manual_seed(seed)
    moe = MoEConfig(dim=16, hidden_dim=20, num_experts=num_experts, top_k=2, activation=activation, use_ffn_bias=bias)
    model = LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=3, num_heads=2, context=24, moe=moe)).eval()
    with torch.no_grad():
        model.embed.weight.mul_(10)
    calib = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(1))
    compress(model, "d2moe-mwq", calib, bits=2, levels=levels, group_size=8)
    for block in model.layers:
        block.ffn.config = dataclasses.replace(block.ffn.config, engine="reference")
    return model


@pytest.fixture(scope="module")
def model():
    return _compressed()


def _tokens(n=3, s=11, seed=2):
    return torch.randint(0, 40, (n, s), generator=torch.Generator().manual_seed(seed))


def _logits(m, t):
    with torch.no_grad():
        return m(t)[0]


def _at_levels(model, k):
    ref = copy.deepcopy(model)
    for block in ref.layers:
        block.ffn.experts.active_levels = k
    return ref


@given(st.dictionaries(st.integers(0, 7), st.lists(st.integers(0, 4), max_size=5, unique=True).map(sorted),
                       max_size=6),
       st.dictionaries(st.integers(0, 7), st.floats(0, 10), max_size=8))
@settings(max_examples=60, deadline=None)
def test_hebf_order_pops_the_hottest_head_and_keeps_each_queue_ascending(queues, heat):
    order = hebf_order(queues, heat)
    assert sorted(order) == sorted((e, k) for e, q in queues.items() for k in q)  # every plane exactly once
    for e in queues:
        assert [k for f, k in order if f == e] == queues[e]  # ascending within an expert
    left = {e: list(q) for e, q in queues.items() if q}
    for e, k in order:  # each pick is the hottest among the current heads
        assert heat.get(e, 0.0) == max(heat.get(f, 0.0) for f in left)
        assert left[e].pop(0) == k
        left = {f: q for f, q in left.items() if q}


def test_hebf_rejects_a_descending_queue():
    with pytest.raises(ValueError, match="ascending"):
        hebf_order({0: [2, 1]}, {})


@pytest.mark.parametrize("miss_levels", [0, 1, 2])
def test_infinite_budget_runs_every_expert_at_the_top_bit_width_after_warm_up(model, miss_levels):
    m = copy.deepcopy(model)
    off = offload_nested(m, "100%", miss_levels=miss_levels)
    t = _tokens()
    first = _logits(m, t)
    if miss_levels == 2:  # misses load every plane: exactly the resident all-levels model from the first pass
        assert torch.equal(first, _logits(model, t))
    else:  # misses are served from the low-bit prefix: differs from the full model on the first pass
        assert off.cache.stats.low_bit > 0 and not torch.equal(first, _logits(model, t))
    second = _logits(m, t)
    assert torch.equal(second, _logits(model, t))  # every expert now at b_K: the full-precision outputs exactly
    assert all(off.cache.levels_of(k) == 2 for k in off.cache.planes)


@pytest.mark.parametrize("k", [0, 1])
def test_low_bit_serving_equals_the_compressed_model_at_that_prefix(model, k):
    m = copy.deepcopy(model)
    offload_nested(m, "100%", miss_levels=k, max_levels=k)
    t = _tokens(seed=5)
    assert torch.equal(_logits(m, t), _logits(_at_levels(model, k), t))
    assert torch.equal(_logits(m, t), _logits(_at_levels(model, k), t))


def test_budget_is_never_exceeded_planes_load_ascending_and_bases_stay(model):
    m = copy.deepcopy(model)
    off = offload_nested(m, "40%", miss_levels=0)
    cache = off.cache
    for seed in range(4):
        _logits(m, _tokens(seed=seed))
    assert cache.max_used <= cache.capacity_bytes
    assert any(op == "evict" for op, _, _ in cache.log)
    loaded: dict = {}
    for op, key, k in cache.log:  # replay: a plane loads only on top of the ones below; evictions pop the top
        planes = loaded.setdefault(key, 0)
        if op == "load":
            assert k == planes
            loaded[key] = planes + 1
        else:
            assert k == planes - 1
            loaded[key] = planes - 1
    # eviction frees residual planes before any base: whenever a base went, no other unpinned residual plane was
    # there to take instead (checked loosely: some residual-plane eviction happened before the first base one)
    evictions = [k for op, _, k in cache.log if op == "evict"]
    assert evictions[0] > 0


@pytest.mark.parametrize("keep_bases", [True, False])
def test_the_hottest_experts_keep_the_most_planes(keep_bases):
    model = _compressed(num_experts=8)
    m = copy.deepcopy(model)
    off = offload_nested(m, "45%", miss_levels=0, keep_bases=keep_bases)
    cache = off.cache
    # a skewed stream: bias every router towards experts 0 and 1 so they are much hotter than the rest
    with torch.no_grad():
        for block in m.layers:
            block.ffn.router.weight[:2] *= 4.0
    for seed in range(6):
        _logits(m, _tokens(seed=seed))
    hot, cold = [], []
    for layer in range(3):
        res = sorted(((cache.heat.get((layer, e), 0.0), cache.levels_of((layer, e))) for e in range(8)
                      if (layer, e) in cache.planes), reverse=True)
        hot += [lv for _, lv in res[:len(res) // 2]]
        cold += [lv for _, lv in res[len(res) - len(res) // 2:]]
    assert sum(hot) / len(hot) > sum(cold) / len(cold)  # the hotter half holds more bit planes per expert
    assert min(hot) >= 0 and cache.max_used <= cache.capacity_bytes
    if not keep_bases:  # upgrades may push out colder experts' bases: the hottest expert of each layer is full
        assert all(cache.levels_of((layer, max(range(8), key=lambda e: cache.heat.get((layer, e), 0.0)))) == 2
                   for layer in range(3))


def test_generation_with_low_bit_misses_matches_full_precision_when_everything_fits(model):
    m = copy.deepcopy(model)
    offload_nested(m, "100%", miss_levels=2)
    prompt = torch.tensor([[3, 17, 22]])
    assert torch.equal(generate(m, prompt, 8), generate(model, prompt, 8))


def test_bit_nested_offload_bad_input(model):
    with pytest.raises(ValueError, match="d2moe-mwq"):
        offload_nested(LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=1, num_heads=2, context=8,
                                                 moe=MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=1))))
    with pytest.raises(ValueError, match="smaller than one expert"):
        offload_nested(copy.deepcopy(model), 10)
    with pytest.raises(ValueError, match="miss_levels"):
        offload_nested(copy.deepcopy(model), "100%", miss_levels=3)
    other = _compressed()
    for block in other.layers:
        block.ffn.experts.spec = dataclasses.replace(block.ffn.experts.spec, format="int")
    with pytest.raises(ValueError, match="not bit-nested"):
        offload_nested(other)


def test_budget_of_one_expert_still_serves_exactly_at_the_miss_prefix():
    model = _compressed(levels=1, activation="gelu", bias=True)
    m = copy.deepcopy(model)
    off = offload_nested(m, "100%", miss_levels=1)
    one = off.store.expert_bytes((0, 0), 1)
    m = copy.deepcopy(model)
    off = offload_nested(m, one, miss_levels=1)
    t = _tokens(n=2, s=7)
    assert torch.equal(_logits(m, t), _logits(model, t))  # biases and gelu experts, one expert resident at a time
    assert off.cache.max_used <= one and off.cache.stats.misses > 0


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    from moekit.compression.runs import compress_run

    from .serving_util import make_run
    base = make_run(tmp_path_factory.mktemp("nested") / "run", **{"model.moe.hidden_dim": 16})
    out = base.parent / "mwq"
    compress_run(base, "d2moe-mwq", out, num_tokens=256, bits=2, levels=2, group_size=8)
    return base, out


def test_compressed_run_offloaded_from_its_file_equals_the_loaded_run(nested_run):
    from moekit.serving.nested_run import load_offloaded_nested
    from moekit.training import load_run

    base, out = nested_run
    _, resident, _ = load_run(out, "cpu")
    for block in resident.layers:
        block.ffn.config = dataclasses.replace(block.ffn.config, engine="reference")
    t = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    _, model, off = load_offloaded_nested(out, "100%", miss_levels=2)
    assert torch.equal(_logits(model, t), _logits(resident, t))
    assert not any(".experts." in n for n, _ in model.named_buffers())  # the planes live in the file only
    _, low, off = load_offloaded_nested(out, "30%", miss_levels=0, prefetch="router")
    _logits(low, t)
    assert off.cache.max_used <= off.cache.capacity_bytes and off.cache.stats.low_bit > 0
    with pytest.raises(ValueError, match="not a compressed run"):
        load_offloaded_nested(base)


def test_serve_cli_takes_a_bit_nested_run_and_refuses_a_tiny_budget(nested_run, capsys):
    pytest.importorskip("uvicorn")
    from moekit.cli.main import main

    assert main(["serve", str(nested_run[1]), "--expert-memory", "1", "--miss-levels", "1"]) == 2
    assert "smaller than one expert" in capsys.readouterr().err
