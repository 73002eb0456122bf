"""MC-SMoE's second stage (spec §1): low-rank + row-sparse experts with PLATON row pruning and distillation;
the spec's minimal faithful test (e): ``L R + S == W`` before pruning, kept fraction of S's rows ==
``final_threshold`` at the end."""

import pytest
import torch

from moekit.compression.mcsmoe import LowRankSparseLinear, compress_expert, kept_fraction


def expert(seed=0, D=20, F=40):
    g = torch.Generator().manual_seed(seed)
    return {"w_gate": torch.randn(F, D, generator=g) / D ** 0.5, "w_up": torch.randn(F, D, generator=g) / D ** 0.5,
            "w_down": torch.randn(D, F, generator=g) / F ** 0.5}


def run(w, x):
    return (torch.nn.functional.silu(x @ w["w_gate"].T) * (x @ w["w_up"].T)) @ w["w_down"].T


def test_init_is_exact_and_the_module_computes_lr_plus_s():
    w = torch.randn(13, 7)
    lin = LowRankSparseLinear(w, rank=3)
    assert torch.allclose(lin.dense(), w, atol=1e-5)
    x = torch.randn(5, 7)
    assert torch.allclose(lin(x), x @ w.T, atol=1e-5)
    assert lin.L.shape == (13, 3) and lin.R.shape == (3, 7)


def test_prune_rows_keeps_the_rows_of_highest_mean_importance_and_never_revives_one():
    lin = LowRankSparseLinear(torch.randn(6, 4), rank=1)
    lin.importance_OI.copy_(torch.tensor([0.1, 0.9, 0.5, 0.0, 0.7, 0.3])[:, None].expand(6, 4))
    lin.prune_rows(0.5)
    assert lin.mask_O.tolist() == [False, True, True, False, True, False]
    lin.importance_OI[0] = 10.0  # a pruned row cannot come back
    lin.prune_rows(0.34)
    assert lin.mask_O.tolist() == [False, True, False, False, True, False]
    x = torch.randn(3, 4)
    expected = x @ (lin.L @ lin.R).T + x @ (lin.S * lin.mask_O[:, None]).T
    assert torch.allclose(lin(x), expected, atol=1e-6)


def test_importance_is_the_ema_of_abs_s_times_its_gradient():
    lin = LowRankSparseLinear(torch.randn(3, 2), rank=1)
    lin(torch.randn(4, 2)).square().sum().backward()
    g = lin.S.grad.clone()
    lin.update_importance(0.85)
    assert torch.allclose(lin.importance_OI, 0.15 * (lin.S * g).abs())
    lin.update_importance(0.85)
    assert torch.allclose(lin.importance_OI, (0.15 * 0.85 + 0.15) * (lin.S * g).abs())


def test_cubic_schedule_runs_from_one_to_the_final_threshold():
    fr = [kept_fraction(t, 40, 0.1, 4, 8) for t in range(41)]
    assert fr[:4] == [1.0] * 4 and fr[32:] == [0.1] * 9
    assert all(a >= b for a, b in zip(fr, fr[1:]))
    assert kept_fraction(4 + 14, 40, 0.1, 4, 8) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)


def test_compressed_expert_ends_at_the_final_threshold_and_distillation_recovers_the_pruning_loss():
    w = expert()
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    mats, losses = compress_expert(w, x, "swiglu", rank=4, final_threshold=0.10, steps=60, lr=3e-3)
    for m, lin in mats.items():
        assert lin.mask_O.float().mean().item() == pytest.approx(0.10)
    trained = {m: lin.dense() for m, lin in mats.items()}
    err_trained = (run(trained, x) - run(w, x)).square().mean()
    untrained = {}  # same rank and final row budget, no distillation: init then prune by magnitude of S
    for m, lin in mats.items():
        fresh = LowRankSparseLinear(w[m], 4)
        fresh.importance_OI.copy_(fresh.S.abs())
        fresh.prune_rows(0.10)
        untrained[m] = fresh.dense()
    err_untrained = (run(untrained, x) - run(w, x)).square().mean()
    assert err_trained < 0.7 * err_untrained
    assert losses[0] < 1e-8 < losses[-1]  # exact at init; pruning 90% of S's rows costs something


def test_full_keep_and_full_rank_is_lossless_and_no_tokens_is_no_training():
    w = expert(D=6, F=10)
    x = torch.randn(8, 6)
    mats, losses = compress_expert(w, x, "swiglu", rank=6, final_threshold=1.0, steps=3, lr=0.0)
    assert all(lin.mask_O.all() for lin in mats.values())
    assert torch.allclose(run({m: lin.dense() for m, lin in mats.items()}, x), run(w, x), atol=1e-5)
    mats, losses = compress_expert(w, x[:0], "swiglu", rank=2, final_threshold=0.5, steps=3)
    assert losses == [] and all(lin.mask_O.float().mean() == 0.5 for lin in mats.values())


def test_bad_final_threshold_is_named():
    with pytest.raises(ValueError, match="final_threshold=0"):
        compress_expert(expert(), torch.randn(4, 20), "swiglu", final_threshold=0)
