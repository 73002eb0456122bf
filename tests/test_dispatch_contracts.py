"""Contracts of ``moekit.dispatch`` that the engine-equality tests do not reach: the registry's bookkeeping
(defaults, ``auto``'s order, what ``supports`` is asked), ``grouped_mm``'s refusals and its weight-layout check
(a pure stride/alignment test, so it runs on CPU although the engine itself only runs on CUDA), and the
hierarchical exchange's block transpose on its own, against a readable loop."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.dispatch import registry
from moekit.dispatch.hierarchical import _transpose_blocks
from moekit.dispatch.registry import Engine, get_engine, register_engine, resolve_engine
from moekit.dispatch.sorted import _grouped_mm_layout_problem, _grouped_mm_supported


@pytest.fixture
def engines(monkeypatch) -> dict[str, Engine]:
    """A private copy of the registry, so engines registered by a test vanish with it."""
    table = dict(registry.ENGINES)
    monkeypatch.setattr(registry, "ENGINES", table)
    return table


def _bank(activation: str = "swiglu", hidden_dim: int = 16):
    """Experts wider than the model (``hidden_dim > dim``): ``auto`` runs plain ``sorted`` on them on CPU."""
    return MoE(MoEConfig(dim=8, hidden_dim=hidden_dim, num_experts=3, top_k=2, activation=activation)).experts


# ----------------------------------------------------------------------------------------------- registry


def test_register_engine_records_the_engine_with_documented_defaults(engines):
    bank, x = _bank(), torch.randn(4, 8)
    routing = MoE(MoEConfig(dim=8, hidden_dim=8, num_experts=3, top_k=2)).route(x)

    def doubled(x_TD, routing, bank):
        return 2 * x_TD

    assert register_engine("test_doubled")(doubled) is doubled  # a decorator: the function is unchanged
    engine = engines["test_doubled"]
    assert engine.name == "test_doubled" and engine.fn is doubled
    assert engine.priority == 0 and engine.compile_friendly is False  # the defaults
    assert engine.supports(x, bank) is None  # supports everything by default
    torch.testing.assert_close(engine(x, routing, bank), 2 * x, rtol=0, atol=0)
    assert get_engine("test_doubled") is engine
    assert resolve_engine("test_doubled", x, bank) is engine

    def picky(x_TD, bank):
        return None if x_TD.shape[0] > 2 else "wants more than 2 tokens"

    register_engine("test_picky", priority=7, supports=picky, compile_friendly=True)(doubled)
    engine = engines["test_picky"]
    assert (engine.priority, engine.compile_friendly, engine.supports) == (7, True, picky)
    with pytest.raises(ValueError, match="engine 'test_picky' cannot run here: wants more than 2 tokens"):
        resolve_engine("test_picky", x[:2], bank)


def test_auto_asks_supports_about_the_bank_it_will_run_on(engines):
    def only_marked(x_TD, bank):
        return None if getattr(bank, "marked", False) else "bank not marked"

    register_engine("test_marked", priority=1000, supports=only_marked)(get_engine("reference").fn)
    bank, x = _bank(), torch.randn(3, 8)
    assert resolve_engine("auto", x, bank).name == "sorted"
    bank.marked = True
    assert resolve_engine("auto", x, bank).name == "test_marked"


def test_auto_prefers_compile_friendly_engines_while_compiling(monkeypatch):
    bank, x = _bank(), torch.randn(3, 8)
    assert resolve_engine("auto", x, bank).name == "sorted"  # eagerly: the highest priority that runs
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_engine("auto", x, bank).name == "sorted_op"  # tracing: compile-friendly first


def test_auto_ranks_by_a_priority_computed_from_the_inputs(engines, monkeypatch):
    def wide_batches(x_TD, bank):
        return 100 if x_TD.shape[0] >= 4 else -100

    register_engine("test_shaped", priority=wide_batches)(get_engine("reference").fn)
    assert engines["test_shaped"].priority is wide_batches
    bank = _bank()
    assert resolve_engine("auto", torch.randn(4, 8), bank).name == "test_shaped"
    assert resolve_engine("auto", torch.randn(3, 8), bank).name == "sorted"
    register_engine("test_fixed", priority=101)(get_engine("reference").fn)  # a fixed priority still competes
    assert resolve_engine("auto", torch.randn(4, 8), bank).name == "test_fixed"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_engine("auto", torch.randn(4, 8), bank).name == "sorted_op"  # compile-friendly still first


def test_auto_runs_sorted_blocked_on_cpu_for_experts_no_wider_than_the_model():
    x = torch.randn(3, 8)
    assert resolve_engine("auto", x, _bank(hidden_dim=4)).name == "sorted_blocked"  # fine-grained
    assert resolve_engine("auto", x, _bank(hidden_dim=8)).name == "sorted_blocked"  # as wide as the model
    assert resolve_engine("auto", x, _bank(hidden_dim=9)).name == "sorted"  # wider: Mixtral-like
    # and only on CPU: elsewhere it ranks below sorted (and grouped_mm, 20, on CUDA)
    blocked, plain = get_engine("sorted_blocked"), get_engine("sorted")
    assert blocked.rank(x, _bank(hidden_dim=4)) > plain.rank(x, _bank(hidden_dim=4))
    assert blocked.rank(x.to("meta"), _bank(hidden_dim=4)) < plain.rank(x.to("meta"), _bank(hidden_dim=4))


def test_auto_with_no_engine_that_can_run_says_so(engines):
    engines.clear()
    register_engine("test_never", supports=lambda x, bank: "never")(lambda x_TD, routing, bank: x_TD)
    with pytest.raises(RuntimeError, match="^no registered engine supports these inputs$"):
        resolve_engine("auto", torch.randn(2, 8), _bank())


# ------------------------------------------------------------------------------------ grouped_mm refusals


def _fake_x(device: str, dtype: torch.dtype):
    """What ``supports`` reads of the input (its device and dtype), for a CUDA device this machine lacks."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_grouped_mm_refuses_cpu_float32_and_badly_laid_out_weights_and_accepts_cuda_bfloat16():
    bank = _bank()
    cpu = "grouped_mm is a loop of matmuls on CPU (no faster); it is chosen automatically only on CUDA"
    assert _grouped_mm_supported(torch.randn(2, 8, dtype=torch.bfloat16), bank) == cpu
    assert _grouped_mm_supported(_fake_x("cuda", torch.float32), bank) == (
        "grouped_mm on CUDA wants bfloat16 inputs, got torch.float32")
    assert _grouped_mm_supported(_fake_x("cuda:0", torch.bfloat16), bank) is None  # contiguous weights
    strided = SimpleNamespace(w_gate=None, w_up=torch.zeros(3, 8, 8), w_down=torch.zeros(3, 8, 16)[..., ::2])
    assert _grouped_mm_supported(_fake_x("cuda", torch.bfloat16), strided) == (
        "experts.w_down (strides (128, 16, 2)) is not laid out for grouped_mm")


def test_grouped_mm_refusal_on_a_torch_without_it(monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    assert _grouped_mm_supported(_fake_x("cuda", torch.bfloat16), _bank()) == (
        "torch.nn.functional.grouped_mm needs torch >= 2.8")


# ------------------------------------------------------------------------ grouped_mm weight-layout check


def _ok(E=3, F_=8, D=8, dtype=torch.float32):
    return torch.zeros(E, F_, D, dtype=dtype)


def _layout_oracle(w: torch.Tensor) -> bool:
    """The rule, written out: 16-byte aligned, a unit stride in one of the last two dims, every other stride a
    multiple of 16 bytes."""
    size = w.element_size()
    aligned = w.data_ptr() % 16 == 0
    unit_last_two = w.stride()[-2] == 1 or w.stride()[-1] == 1
    others = all((s * size) % 16 == 0 for s in w.stride() if s != 1)
    return aligned and unit_last_two and others


def _cases() -> dict[str, torch.Tensor]:
    misaligned = torch.zeros(1 + 3 * 8 * 8)[1:].view(3, 8, 8)  # 4 bytes past a 16-byte boundary
    return {
        "contiguous": _ok(),
        "contiguous bf16": _ok(dtype=torch.bfloat16),
        "transposed (unit stride in dim -2)": torch.zeros(3, 8, 4).transpose(1, 2),
        "misaligned": misaligned,
        "row stride of 12 bytes": _ok(D=3),
        "bf16 row stride of 8 bytes": _ok(D=4, dtype=torch.bfloat16),
        "no unit stride, all 16-byte multiples": torch.zeros(3, 8, 8, 4)[..., 0],
        "unit stride only in the expert dim": torch.zeros(8, 8, 4).permute(2, 0, 1),
        "step-2 columns": torch.zeros(3, 8, 16)[..., ::2],
    }


def test_layout_check_agrees_with_the_rule_written_out():
    expected_bad = {"misaligned", "row stride of 12 bytes", "bf16 row stride of 8 bytes",
                    "no unit stride, all 16-byte multiples", "unit stride only in the expert dim", "step-2 columns"}
    assert {name for name, w in _cases().items() if not _layout_oracle(w)} == expected_bad  # the oracle itself
    for name, w in _cases().items():
        for slot in ("w_gate", "w_up", "w_down"):  # the bad weight in each position, the others fine
            bank = SimpleNamespace(w_gate=_ok(), w_up=_ok(), w_down=_ok())
            setattr(bank, slot, w)
            problem = _grouped_mm_layout_problem(bank)
            if name in expected_bad:
                assert problem == f"experts.{slot} (strides {tuple(w.stride())}) is not laid out for grouped_mm", \
                    (name, slot, problem)
            else:
                assert problem is None, (name, slot, problem)


def test_layout_check_skips_an_absent_gate_but_checks_the_rest():
    bad = torch.zeros(3, 8, 16)[..., ::2]
    assert _grouped_mm_layout_problem(SimpleNamespace(w_gate=None, w_up=_ok(), w_down=_ok())) is None
    assert _grouped_mm_layout_problem(SimpleNamespace(w_gate=None, w_up=bad, w_down=_ok())) == (
        "experts.w_up (strides (128, 16, 2)) is not laid out for grouped_mm")
    assert _grouped_mm_layout_problem(SimpleNamespace(w_gate=None, w_up=_ok(), w_down=bad)) == (
        "experts.w_down (strides (128, 16, 2)) is not laid out for grouped_mm")
    # a real bank: gated and not, as built (contiguous parameters)
    assert _grouped_mm_layout_problem(_bank("swiglu")) is None
    assert _grouped_mm_layout_problem(_bank("gelu")) is None
    # the first offending weight is named
    assert _grouped_mm_layout_problem(SimpleNamespace(w_gate=bad, w_up=bad, w_down=bad)).startswith("experts.w_gate ")


# ----------------------------------------------------------------------- hierarchical block transpose


def _transpose_oracle(counts_AB: torch.Tensor) -> list[int]:
    """Rows laid out as blocks [a][b] (a-major), listed block by block in [b][a] order."""
    A, B = counts_AB.shape
    start, starts = 0, {}
    for a, b in itertools.product(range(A), range(B)):
        starts[a, b] = start
        start += int(counts_AB[a, b])
    return [starts[a, b] + i for b in range(B) for a in range(A) for i in range(int(counts_AB[a, b]))]


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 2), (4, 4), (0, 3), (3, 0)])
def test_transpose_blocks_matches_a_loop_including_empty_blocks_and_grids(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        counts = torch.randint(0, 4, shape, generator=g)
        perm = _transpose_blocks(counts)
        assert perm.dtype == torch.int64 and perm.tolist() == _transpose_oracle(counts)
        if counts.numel():  # a permutation of all the rows
            assert sorted(perm.tolist()) == list(range(int(counts.sum())))
