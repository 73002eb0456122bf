"""Cache simulator: the spec's invariants (Belady >= LRU on any trace, full capacity -> 100% after warm-up,
perfect predictor -> no stalls, prefetch never hurts with room to spare), traces recorded, saved and checked."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.serving.cache import POLICIES
from moekit.serving.lookahead import expert_aware_batches, expert_loads
from moekit.serving.simulate import simulate, sweep
from moekit.serving.trace import (
    Trace,
    affinity_table,
    load_trace,
    record_trace,
    save_trace,
)

from .serving_util import make_run


@st.composite
def traces(draw):
    L = draw(st.integers(1, 3))
    E = draw(st.integers(1, 6))
    T = draw(st.integers(1, 12))
    sets = st.lists(st.integers(0, E - 1), min_size=1, max_size=min(E, 3), unique=True)
    steps = [[{"experts": sorted(draw(sets)), "predicted": sorted(draw(sets)) if layer + 1 < L else []}
              for layer in range(L)] for _ in range(T)]
    return Trace([E] * L, [100] * L, steps)


@settings(max_examples=150, deadline=None)
@given(traces(), st.integers(1, 18))
def test_belady_hit_rate_is_at_least_lru_on_any_trace(trace, experts):
    cap = 100 * experts
    belady = simulate(trace, "belady", "none", cap)
    for policy in ("lru", "lfu", "activation", "reuse"):
        assert belady.hits >= simulate(trace, policy, "none", cap).hits


@settings(max_examples=60, deadline=None)
@given(traces())
def test_capacity_for_every_expert_hits_everything_after_warm_up(trace):
    cap = 100 * sum(trace.num_experts)
    for policy in ("lru", "lfu", "activation", "belady"):
        r = simulate(trace, policy, "router", cap)
        assert r.hit_rate_after_warmup == 1.0
        assert r.bytes_moved <= cap  # every expert moved at most once


@settings(max_examples=60, deadline=None)
@given(traces())
def test_perfect_predictor_with_enough_bandwidth_never_stalls_after_the_first_layer(trace):
    # room for two layers' experts; loading a layer's experts takes less than one layer's compute
    cap = 100 * 2 * max(trace.num_experts)
    r = simulate(trace, "lru", "oracle", cap, bandwidth=100 * 6 / 1e-4, compute_seconds=1e-4)
    assert r.stalls <= 1  # only the very first layer, which nothing predicts
    assert r.prefetch_recall == 1.0 or len(trace.steps) * trace.num_layers == 1
    none = simulate(trace, "lru", "none", cap, bandwidth=100 * 6 / 1e-4, compute_seconds=1e-4)
    assert r.stall_seconds <= none.stall_seconds + 1e-12


def test_prefetch_reduces_stalls_when_recall_is_positive():
    # layer 0's router guesses layer 1's expert right every time
    steps = [[{"experts": [t % 4], "predicted": [(t + 1) % 4]}, {"experts": [(t + 1) % 4], "predicted": []}]
             for t in range(8)]
    trace = Trace([4, 4], [100, 100], steps)
    base = simulate(trace, "lru", "none", 200, bandwidth=1e6, compute_seconds=1e-4)
    routed = simulate(trace, "lru", "router", 200, bandwidth=1e6, compute_seconds=1e-4)
    assert routed.prefetch_recall == 1.0 and routed.stall_seconds < base.stall_seconds
    assert routed.stalls < base.stalls


def test_affinity_table_counts_transitions():
    steps = [[{"experts": [0], "predicted": []}, {"experts": [2], "predicted": []}]] * 3 + \
            [[{"experts": [0], "predicted": []}, {"experts": [1], "predicted": []}]]
    table = affinity_table(Trace([2, 3], [1, 1], steps), fanout=1)
    assert table == {(0, 0): [2]}


def test_recorded_trace_replays_and_is_checked_against_its_model(tmp_path):
    run = make_run(tmp_path / "run")
    trace = record_trace(run, [[1, 2, 3], [50, 60]], 4)
    assert len(trace.steps) == 8 and trace.num_layers == 3 and trace.num_experts == [6, 6, 6]
    assert all(len(entry["experts"]) >= 2 for step in trace.steps for entry in step)  # top-2 per token
    path = tmp_path / "t.json"
    save_trace(path, trace)
    again = load_trace(path)
    assert again.steps == trace.steps
    results = sweep(again, [trace.expert_bytes[0] * 18, trace.expert_bytes[0] * 4], bandwidth=1e9)
    assert len(results) == 2 * len(POLICIES) * 4  # every budget x policy x prefetcher
    with pytest.raises(ValueError, match="another model"):
        again.check_model([8, 8, 8], trace.expert_bytes)
    path.write_text(json.dumps({"format": "moekit-expert-trace", "model": {}, "steps": []}))
    with pytest.raises(ValueError, match="malformed"):
        load_trace(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_trace(path)
    with pytest.raises(ValueError, match="smaller than one expert"):
        simulate(again, "lru", "none", 1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sets(st.integers(0, 7), min_size=1, max_size=2), min_size=0, max_size=12), st.integers(1, 5))
def test_expert_aware_batching_never_loads_more_experts_than_arrival_order(experts, max_batch):
    batches = expert_aware_batches(experts, max_batch)
    assert sorted(r for b in batches for r in b) == list(range(len(experts)))  # every request exactly once
    assert all(1 <= len(b) <= max_batch for b in batches)
    assert len(batches) == -(-len(experts) // max_batch)  # as few batches as arrival order
    fifo = [list(range(i, min(i + max_batch, len(experts)))) for i in range(0, len(experts), max_batch)]
    assert expert_loads(batches, experts) <= expert_loads(fifo, experts)


def test_expert_aware_batching_groups_requests_of_one_expert():
    experts = [{0}, {1}, {0}, {1}, {0}, {1}]
    batches = expert_aware_batches(experts, 3)
    assert batches == [[0, 2, 4], [1, 3, 5]] and expert_loads(batches, experts) == 2


def test_reuse_policy_matches_belady_on_a_cyclic_decode_trace_where_lru_thrashes():
    # every pass uses the same 2 experts in each of 4 layers; the cache holds 6 of the 8: LRU always evicts the
    # expert needed next (no hit after warm-up), Belady evicts the layer just run, and so does the expected
    # reuse distance once the experts are known
    steps = [[{"experts": [0, 1], "predicted": []} for _ in range(4)] for _ in range(30)]
    trace = Trace([8] * 4, [100] * 4, steps)
    lru, reuse, belady = (simulate(trace, p, "none", 600) for p in ("lru", "reuse", "belady"))
    assert lru.hits == 0
    assert belady.hits > 100
    assert reuse.hits >= belady.hits - 2  # equal but for the first pass, while the estimates form


def test_reuse_policy_evicts_the_unlikely_and_the_far_ahead_first():
    from moekit.serving.cache import ReusePolicy

    with pytest.raises(ValueError, match="decay"):
        ReusePolicy(decay=0.0)
    p = ReusePolicy(num_layers=4, num_experts=8, decay=1.0)
    for _ in range(10):  # ten decode steps: layer l uses expert 0 always, expert 1 every other step
        for layer in range(4):
            p.access((layer, 0))
    for layer in range(4):
        for _ in range(5):
            p.count[(layer, 1)] += 1
    p.current_layer = 1  # layer 1 is running: layer 2 comes next, layer 1 itself last
    assert p.victim([(2, 0), (2, 1), (2, 5)]) == (2, 5)  # never used: furthest expected use
    assert p.victim([(2, 0), (1, 0), (3, 0)]) == (1, 0)  # equally likely: the layer that just ran goes
    assert p.expected_distance((2, 0)) < p.expected_distance((2, 1))


def test_reuse_policy_decay_weighs_recent_tokens():
    from moekit.serving.cache import ReusePolicy

    old, fresh = ReusePolicy(num_layers=1, num_experts=4, decay=0.5), ReusePolicy(num_layers=1, num_experts=4, decay=1.0)
    for p in (old, fresh):
        for step in range(12):  # expert 0 for 8 visits, then expert 1 for 4; a second layer in between
            p.access((0, 0 if step < 8 else 1))
            p.access((1, 3))
    # counting every visit, expert 0 (8 uses) looks likelier than expert 1 (4 recent uses); with decay, the reverse
    assert fresh.victim([(0, 0), (0, 1)]) == (0, 1)
    assert old.victim([(0, 0), (0, 1)]) == (0, 0)
