"""MC-SMoE as a method (``mc-smoe``: M-SMoE merging, then low-rank + row-sparse experts) and its
``lowrank-sparse`` bank: the per-expert path ``(x Rᵀ) Lᵀ + x S_keptᵀ`` against the dense reconstruction
``L R + S`` (outputs and input gradients, odd sizes, one token, no tokens), an exact save/load round trip, and
corrupt files refused with a message naming the tensor."""

import math

import pytest
import torch

from moekit import MoEConfig
from moekit.compression import artifact
from moekit.compression.api import compress
from moekit.compression.bank import BankSpec, CompressedBank
from moekit.compression.calibrate import CompressionError
from moekit.compression.mcsmoe import (
    LowRankSparseLinear,
    compress_expert,
    dense_expert,
    lowrank_bank,
    lowrank_sparse_dense,
    lowrank_sparse_linear,
    rank_for_fraction,
)
from moekit.models import LanguageModel, ModelConfig
from moekit.training.checkpoint import CheckpointError


def tiny_lm(seed=0, hidden_dim=24, activation="swiglu"):
    torch.manual_seed(seed)
    moe = MoEConfig(dim=16, hidden_dim=hidden_dim, num_experts=8, top_k=2, activation=activation)
    return LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()


def calib(n=12, seed=1):
    return torch.randint(0, 40, (n, 16), generator=torch.Generator().manual_seed(seed))


def logits(model, t):
    with torch.no_grad():
        return model(t)[0]


def rand_expert(D, F, gated, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = {"w_up": torch.randn(F, D, generator=g) / D ** 0.5, "w_down": torch.randn(D, F, generator=g) / F ** 0.5}
    if gated:
        w["w_gate"] = torch.randn(F, D, generator=g) / D ** 0.5
    if bias:
        w.update(b_up=torch.randn(F, generator=g), b_down=torch.randn(D, generator=g))
        if gated:
            w["b_gate"] = torch.randn(F, generator=g)
    return w


@pytest.mark.parametrize("T,C,R,K,N", [(7, 13, 11, 3, 4), (1, 5, 9, 2, 9), (0, 6, 4, 1, 1), (5, 8, 6, 6, 0)])
def test_lowrank_sparse_linear_equals_dense_reconstruction_with_gradients(T, C, R, K, N):
    g = torch.Generator().manual_seed(T + C)
    L, Rm, S = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((R, K), (K, C), (N, C)))
    rows = torch.randperm(R, generator=g)[:N].sort().values.to(torch.int32)
    bias = torch.randn(R, generator=g, dtype=torch.float64)
    W = lowrank_sparse_dense(L, Rm, S, rows)
    expect_W = L @ Rm
    expect_W[rows.long()] += S
    assert torch.allclose(W, expect_W, atol=1e-12)
    x = torch.randn(T, C, generator=g, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = lowrank_sparse_linear(x, L, Rm, S, rows, bias)
    ref = xr @ W.T + bias
    assert y.shape == (T, R) and torch.allclose(y, ref, atol=1e-10)
    up = torch.randn(T, R, generator=g, dtype=torch.float64)
    (y * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-10)


def bank_of(D, F, activation, bias, G=3, E=5, rank=3, ft=0.3, seed=0):
    gated = activation == "swiglu"
    mats, biases = [], {}
    for g in range(G):
        w = rand_expert(D, F, gated, bias, seed + g)
        x = torch.randn(9, D, generator=torch.Generator().manual_seed(50 + g))
        m, _ = compress_expert(w, x, activation, rank=rank, final_threshold=ft, steps=3, lr=1e-2)
        mats.append(m)
        for b in ("b_gate", "b_up", "b_down"):
            if b in w:
                biases.setdefault(b, []).append(w[b])
    slots = torch.tensor([g % G for g in range(E)])
    stacked = {b: torch.stack(v) for b, v in biases.items()}
    return lowrank_bank(mats, slots, activation=activation, biases=stacked), mats


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True), ("swiglu", True)])
@pytest.mark.parametrize("T", [0, 1, 11])
def test_bank_expert_equals_dense_reconstruction_outputs_and_gradients(activation, bias, T):
    D, F = 13, 21  # odd sizes
    bank, mats = bank_of(D, F, activation, bias)
    assert bank.spec.kept_rows == {m: round(0.3 * r) for m, (r, _) in bank.spec.matrices().items()}
    for e in range(bank.num_experts):
        g = int(bank.slot_to_stored_E[e])
        w = bank.weights(e)
        for m, lin in mats[g].items():  # the stored factors reproduce the trained module exactly
            assert torch.allclose(w[m], lin.dense(), atol=1e-6)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(e), requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        y, ref = bank.expert(x, e), dense_expert(w, xr, activation)
        assert y.shape == (T, D) and torch.allclose(y, ref, atol=1e-5)
        (y.square().sum() + y.sum()).backward()
        (ref.square().sum() + ref.sum()).backward()
        assert torch.allclose(x.grad, xr.grad, atol=1e-5)


def test_bank_stores_only_factors_and_kept_rows():
    bank, _ = bank_of(13, 21, "swiglu", False, G=2, E=4, rank=3, ft=0.3)
    per_expert = sum(R * 3 + 3 * C + round(0.3 * R) * (C + 1) for R, C in bank.spec.matrices().values())
    assert bank.stored_bytes() == 4 * 2 * per_expert + 8 * 4  # float32 factors, int32 rows, int64 slot map
    assert not any(b.shape[-2:] == (21, 13) for n, b in bank.named_buffers() if n.endswith("_S"))


def test_mc_smoe_merges_then_compresses_to_the_target_and_keeps_the_router():
    model, ref = tiny_lm(), tiny_lm()
    report = compress(model, "mc-smoe", calib(), target_memory=0.25, lowrank_steps=5)
    assert 0.15 < report.memory_fraction <= 0.25
    for b, rb in zip(model.layers, ref.layers):
        bank = b.ffn.experts
        assert bank.spec.format == "lowrank-sparse" and bank.spec.num_stored < 8
        assert torch.equal(b.ffn.router.weight, rb.ffn.router.weight)  # router untouched (M-SMoE)
        for m, k in bank.spec.kept_rows.items():  # spec (e): kept fraction of S's rows is final_threshold
            assert k == max(1, round(0.10 * bank.spec.matrices()[m][0]))
        G = bank.spec.num_stored
        assert sorted(set(bank.slot_to_stored_E.tolist())) == list(range(G))
    assert sum(b.ffn.experts.spec.num_stored for b in model.layers) == 2 * round(math.sqrt(0.25) * 8)


def test_mc_smoe_with_full_rank_and_every_row_is_m_smoe():
    a, b = tiny_lm(), tiny_lm()
    compress(a, "m-smoe", calib(), keep_experts=4)
    compress(b, "mc-smoe", calib(), keep_experts=4, rank=16, final_threshold=1.0, lowrank_steps=0)
    assert torch.allclose(logits(a, calib(2, 5)), logits(b, calib(2, 5)), atol=1e-4)


def test_distillation_toward_unmerged_experts_lowers_the_error():
    ref = tiny_lm()
    want = logits(ref, calib())
    errs = []
    for steps in (0, 40):
        m = tiny_lm()
        compress(m, "mc-smoe", calib(), target_memory=0.5, lowrank_steps=steps, lowrank_lr=3e-3)
        errs.append(float((logits(m, calib()) - want).square().mean()))
    assert errs[1] < 0.8 * errs[0]  # measured 0.0040 vs 0.0075


def test_group_without_routed_tokens_keeps_largest_rows_of_s():
    w = rand_expert(6, 10, True, False, 3)
    mats, losses = compress_expert(w, torch.zeros(0, 6), "swiglu", rank=2, final_threshold=0.3, steps=4)
    assert losses == []
    for lin in mats.values():
        score = lin.S.detach().abs().mean(dim=1)
        k = int(lin.mask_O.sum())
        assert set(lin.mask_O.nonzero().flatten().tolist()) == set(score.topk(k).indices.tolist())
    bank = lowrank_bank([mats], torch.zeros(2, dtype=torch.long), activation="swiglu")
    assert bank.expert(torch.zeros(0, 6), 1).shape == (0, 6)


def test_round_trip_is_exact_and_corrupt_files_are_refused(tmp_path):
    model = tiny_lm()
    report = compress(model, "mc-smoe", calib(), target_memory=0.5, lowrank_steps=3)
    path = tmp_path / "m.safetensors"
    header = artifact.header_of(model, "mc-smoe", report.options)
    artifact.save_compressed_state(model, path, header)
    fresh = tiny_lm(seed=1)
    artifact.load_compressed_state(fresh, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, k
    assert torch.equal(logits(model, calib(2, 7)), logits(fresh, calib(2, 7)))

    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path))
    meta = {"moekit_compression": __import__("json").dumps(header)}
    key = next(k for k in tensors if k.endswith("w_up_rows"))

    def refused(changed, *fragments):
        bad = tmp_path / "bad.safetensors"
        save_file({**tensors, **changed}, str(bad), metadata=meta)
        with pytest.raises(CheckpointError) as e:
            artifact.load_compressed_state(tiny_lm(seed=2), bad)
        for f in fragments:
            assert f in str(e.value)

    refused({key: tensors[key].long()}, key, "torch.int64")  # wrong dtype
    refused({key.replace("rows", "S"): tensors[key.replace("rows", "S")][:, :-1].contiguous()}, key.replace("rows", "S"))
    out_of_range = tensors[key].clone()
    out_of_range[0, -1] = 10 ** 6
    refused({key: out_of_range}, "w_up_rows", "not distinct, sorted")
    dup = tensors[key].clone()
    dup[0, 0] = dup[0, -1] if dup.shape[1] > 1 else -1
    refused({key: dup}, "w_up_rows")


def test_bad_settings_are_named():
    with pytest.raises(CompressionError, match="target_memory=0.01 cannot be met by mc-smoe"):
        compress(tiny_lm(), "mc-smoe", calib(), target_memory=0.01)
    with pytest.raises(CompressionError, match="drop bits"):
        compress(tiny_lm(), "mc-smoe", calib(), bits=4)
    with pytest.raises(CompressionError, match="rank=0"):
        compress(tiny_lm(), "mc-smoe", calib(), keep_experts=4, rank=0)
    with pytest.raises(CompressionError, match="final_threshold=0"):
        compress(tiny_lm(), "mc-smoe", calib(), keep_experts=4, final_threshold=0)
    with pytest.raises(CompressionError, match="keep_experts"):
        compress(tiny_lm(), "mc-smoe", calib())
    with pytest.raises(ValueError, match="kept_rows"):
        BankSpec(num_experts=2, num_stored=1, dim=4, hidden_dim=6, activation="gelu", format="lowrank-sparse",
                 rank=2, kept_rows={"w_up": 7, "w_down": 1})
    with pytest.raises(ValueError, match="rank=0"):
        BankSpec(num_experts=2, num_stored=1, dim=4, hidden_dim=6, activation="gelu", format="lowrank-sparse",
                 rank=0, kept_rows={"w_up": 1, "w_down": 1})
    assert rank_for_fraction((512, 256), 0.5, 0.1) == math.floor((0.5 * 512 * 256 - 51 * 257) / 768)
    assert isinstance(CompressedBank, type) and LowRankSparseLinear is not None
