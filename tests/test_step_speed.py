"""Issue 20: the training-step speed work (fused AdamW, the step profiler) keeps what it computes."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.bench.step import StepHarness, compare_steps, format_profile, profile_step
from moekit.recipes import load_preset
from moekit.training.config import with_overrides
from moekit.training.optim import build_optimizer, fused_supported


def _tiny(**overrides):
    return with_overrides(load_preset("tiny"), {"train.batch_size": "2", **overrides})


def test_fused_and_single_tensor_adamw_train_the_same_model():
    """Three whole training steps of the tiny MoE with each optimizer: same losses and weights to float32
    rounding (the fused kernel is a faster schedule of the same update, not another optimizer)."""
    fused = StepHarness.build(_tiny())
    single = StepHarness.build(_tiny(**{"train.fused_optimizer": "false"}))
    assert fused.optimizer.defaults["fused"] is True
    assert not single.optimizer.defaults["fused"] and single.optimizer.defaults["foreach"] is False
    for _ in range(3):
        a, b = fused(), single()
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    moved = 0.0
    for (name, p), q in zip(fused.model.named_parameters(), single.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, (p - StepHarness.build(_tiny()).model.get_parameter(name)).abs().max().item())
    assert moved > 1e-4  # the steps did change the weights: the equality above is not of untouched models


def test_fused_adamw_state_resumes_exactly():
    """The fused optimizer's state round-trips through state_dict: a resumed copy takes the same next step."""
    h = StepHarness.build(_tiny())
    h(), h()
    twin = StepHarness.build(_tiny())
    twin.model.load_state_dict(h.model.state_dict())
    twin.optimizer.load_state_dict(copy.deepcopy(h.optimizer.state_dict()))  # (load shares the tensors)
    twin.step = h.step
    torch.manual_seed(5)  # (a real resume restores the RNG state too)
    h()
    torch.manual_seed(5)
    twin()
    for p, q in zip(h.model.parameters(), twin.model.parameters()):
        assert torch.equal(p, q)


def test_fused_only_where_supported():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert fused_supported(params)
    assert not fused_supported([torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)])
    assert not fused_supported([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    model = torch.nn.Linear(3, 3).to(device="meta")
    opt = build_optimizer(model, load_preset("tiny").train)  # meta tensors: the single-tensor loop
    assert opt.defaults["foreach"] is False and not opt.defaults["fused"]


def test_profile_attributes_the_step_to_its_parts():
    h = StepHarness.build(_tiny())
    prof = profile_step(h, steps=1, warmup=1, collect_stats=True)
    cats = prof["categories_ms_per_step"]
    for part in ("forward: router", "forward: moe (dispatch, experts, combine)", "forward: attention", "optimizer"):
        assert cats.get(part, 0.0) > 0.0, (part, cats)
    assert any(k.startswith("backward: ") for k in cats)
    assert sum(cats.values()) == pytest.approx(prof["total_ms_per_step"], rel=1e-6)
    # the per-step host reads of the trainer (loss, aux, gradient norm) and the engine's segment sizes
    assert prof["syncs_per_step"].get("aten::item", 0) >= 3
    text = format_profile("tiny", prof)
    assert "forward: router" in text and "host syncs" in text
    # the forward hooks used for the ranges are gone afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in h.model.modules())


def test_compare_steps_reports_ratios_to_the_first():
    a, b = StepHarness.build(_tiny()), StepHarness.build(_tiny(**{"train.batch_size": "4"}))
    out = compare_steps({"a": a, "b": b}, repeats=2, warmup=1)
    assert out["a"]["tokens_per_s_ratio"] == 1.0
    assert out["b"]["tokens_per_s_ratio"] == pytest.approx(out["b"]["tokens_per_s"] / out["a"]["tokens_per_s"])
    assert a.step == b.step == 3


# --- bad input: shapes that do not fit in memory are refused with the estimate -------------------------------

def test_memory_check_names_the_estimate_and_the_fix():
    from moekit.bench.memory import check_fits
    from moekit.configs import ConfigError

    check_fits(2**20, "x", "fix it", available=2**30)  # fits: nothing happens
    with pytest.raises(ConfigError, match=r"needs about 2\.0 GiB .* has 1\.0 GiB available; lower it"):
        check_fits(2 * 2**30, "this thing", "lower it", available=2**30)


def test_layer_bench_estimate_covers_what_autograd_saves():
    """The estimate is above the bytes the layer really saves for backward (a small shape, measured)."""
    from moekit.bench.memory import layer_bench_bytes
    from moekit.bench.timing import saved_activation_bytes
    from moekit.layers import MoE, MoEConfig

    moe = MoE(MoEConfig(dim=32, hidden_dim=48, num_experts=6, top_k=2, num_shared_experts=1))
    x = torch.randn(1, 300, 32, requires_grad=True)
    saved = saved_activation_bytes(lambda: moe(x), moe)
    estimate = layer_bench_bytes(32, 48, 6, 2, 1, 300, candidates=1)
    params = sum(p.numel() for p in moe.parameters()) * 4
    assert saved < estimate - 2 * params  # the activation part alone covers it
    assert estimate < 20 * (saved + 2 * params)  # and is not absurdly loose


def test_bench_refuses_a_shape_that_does_not_fit(capsys, monkeypatch):
    from moekit.bench import memory
    from moekit.cli.main import main

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * 2**30)
    code = main(["bench", "--shapes", "fine-s", "--tokens", "10000000", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "moekit bench of fine-s at 10,000,000 tokens needs about" in err[0] and "4.0 GiB available" in err[0]
    assert "--tokens" in err[0]


def test_compare_refuses_a_study_that_does_not_fit(tmp_path, capsys, monkeypatch):
    from moekit.bench import memory
    from moekit.cli.main import main

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)
    out = tmp_path / "study"
    code = main(["compare", "moe-vs-dense", "--quick", "--out", str(out), "--workers", "2",
                 "--budget", "1e16", "--train.batch_size=4096", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "this study (2 run(s) at once" in err[0] and "1.0 GiB available" in err[0]
    assert not out.exists()  # nothing half-written
    # the same study at its own batch size fits that budget: the estimate is not what refuses everything
    from moekit.bench.memory import training_bytes
    from moekit.compare import load_study, plan_study
    specs = plan_study(load_study("moe-vs-dense", quick=True))
    assert max(training_bytes(s.config, 2) for s in specs) < 2**30


def test_recipe_study_plans_equal_flops_at_equal_active_parameters():
    from moekit.compare import load_study, plan_study
    from moekit.models import count

    for quick in (False, True):
        specs = plan_study(load_study("recipes", quick=quick))
        assert {s.arm for s in specs} == {"dense", "coarse-top2", "fine-shared", "fine-shared-auxfree"}
        flops = [s.planned_flops for s in specs]
        assert max(flops) / min(flops) < 1.02
        if not quick:
            active = {s.arm: count(s.config.model).active_params for s in specs}
            assert max(active.values()) / min(active.values()) < 1.02, active
            auxfree = next(s for s in specs if s.arm == "fine-shared-auxfree").config.model.moe.router
            assert auxfree.aux_loss_coef == 0 and auxfree.bias_update_rate > 0


def test_harness_collects_routing_statistics_when_asked_and_on_logging_steps():
    h = StepHarness.build(_tiny(**{"train.log_every": "2"}))
    assert "load_cv" in h(collect_stats=True)
    assert "load_cv" not in h(collect_stats=False)
    assert "load_cv" in h()  # step 2: a logging step
    assert "load_cv" not in h()  # step 3: not one


def test_profile_runs_its_steps_with_the_requested_statistics(monkeypatch):
    h = StepHarness.build(_tiny())
    seen = []
    real = StepHarness.__call__

    def spy(self, collect_stats=None):
        seen.append(collect_stats)
        return real(self, collect_stats)

    monkeypatch.setattr(StepHarness, "__call__", spy)
    profile_step(h, steps=2, warmup=1, collect_stats=True)
    assert seen == [True, True, True]


def test_profile_figures_are_per_step_sorted_and_count_host_reads_exactly():
    from torch.profiler import ProfilerActivity, profile

    h = StepHarness.build(_tiny())
    h(False)
    with profile(activities=[ProfilerActivity.CPU]) as own:  # the same step, counted independently
        h(False)
    reads = sum(e.name == "aten::_local_scalar_dense" for e in own.events())
    assert reads >= 3
    prof = profile_step(h, steps=2, warmup=0, collect_stats=False)
    assert prof["syncs_per_step"]["aten::_local_scalar_dense"] == reads
    cats = prof["categories_ms_per_step"]
    assert sum(cats.values()) == pytest.approx(prof["total_ms_per_step"], rel=1e-6)  # both per step (2 steps)
    assert list(cats.values()) == sorted(cats.values(), reverse=True)
    assert list(prof["ops_ms_per_step"].values()) == sorted(prof["ops_ms_per_step"].values(), reverse=True)
    assert not any(op.startswith(("autograd::", "Optimizer.")) for op in prof["ops_ms_per_step"])
    text = format_profile("tiny", prof)
    shown = [float(line.rsplit(" ms ", 1)[0].split()[-1]) for line in text.splitlines()[1:]
             if line.rstrip().endswith("%")]
    assert shown == sorted(shown, reverse=True) and len(shown) >= 4
    assert "  top backward functions: " in text


def test_profile_categories_of_modules():
    from moekit.bench.step import _category_of
    from moekit.models import LanguageModel

    model = LanguageModel(_tiny().model)
    by_class = {type(m).__name__: _category_of(m) for m in model.modules()}
    assert {c for n, c in by_class.items() if "Attention" in n} == {"attention"}
    assert by_class["Embedding"] == "embedding"
    assert by_class[type(model).__name__] is None
    assert _category_of(torch.nn.RMSNorm(4)) == "norms" and _category_of(torch.nn.LayerNorm(4)) == "norms"
    assert _category_of(torch.nn.Linear(2, 2)) is None
