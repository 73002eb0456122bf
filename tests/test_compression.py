"""moekit.compression: quantisers, GPTQ, the QMoE codec, the calibration pass, M-SMoE and the baselines, and the
compressed artefact (the specs' minimal faithful tests, spec §1 and §4)."""

import itertools
import math

import pytest
import torch

from moekit import MoEConfig, RouterConfig
from moekit.compression import artifact
from moekit.compression.api import compress
from moekit.compression.bank import CompressedBank, expert_weights
from moekit.compression.calibrate import CompressionError, calibrate
from moekit.compression.codec import (
    build_codebook,
    decode_rows,
    encode_rows,
    to_tunstall,
)
from moekit.compression.gptq import gptq, hessian
from moekit.compression.merge import (
    align_neurons,
    global_group_counts,
    lowrank_sparse_init,
    merge_weights,
    permute_expert,
)
from moekit.compression.quant import (
    minmax_grid,
    pack_bits,
    rtn,
    ternary_grid,
    unpack_bits,
)
from moekit.models import LanguageModel, ModelConfig
from moekit.training.checkpoint import CheckpointError


def tiny_lm(seed=0, num_experts=8, top_k=2, hidden_dim=24, activation="swiglu"):
    torch.manual_seed(seed)
    moe = MoEConfig(dim=16, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k, activation=activation)
    return LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()


def tokens(n=12, s=16, seed=1):
    return torch.randint(0, 40, (n, s), generator=torch.Generator().manual_seed(seed))


def logits(model, t):
    with torch.no_grad():
        return model(t)[0]


# ---- quantisers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_bits_round_trip_odd_columns(bits):
    q = torch.randint(0, 2 ** bits, (5, 13))
    packed = pack_bits(q, bits)
    assert packed.shape == (bits, 5, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, 13), q)


def test_ternary_rows_take_three_values_with_half_extreme_thresholds():
    w = torch.randn(6, 40)
    grid = ternary_grid(w)
    wq = grid.round(w)
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    for r in range(6):
        assert set(wq[r].tolist()) <= {float(lo[r]), 0.0, float(hi[r])}
        assert torch.equal(wq[r] == hi[r], w[r] > hi[r] / 2)
        assert torch.equal(wq[r] == lo[r], w[r] < lo[r] / 2)


def test_rtn_error_is_within_half_a_step():
    w = torch.randn(7, 33)
    q, grid = rtn(w, 4)
    assert q.min() >= 0 and q.max() <= 15
    assert ((grid.dequantize(q) - w).abs() <= grid.scale_R[:, None] / 2 + 1e-6).all()


# ---- GPTQ ----------------------------------------------------------------------------------------------------

def test_gptq_with_identity_hessian_and_huge_damping_is_rtn():
    w = torch.randn(9, 20)
    q, _ = gptq(w, torch.eye(20), lambda m: minmax_grid(m, 3), percdamp=1e6, blocksize=7)
    assert torch.equal(q, rtn(w, 3)[0])


def test_gptq_beats_rtn_on_output_error_for_correlated_inputs():
    torch.manual_seed(0)
    x = torch.randn(400, 8) @ torch.randn(8, 24)  # low-rank, strongly correlated inputs
    w = torch.randn(10, 24)
    q, grid = gptq(w, hessian(x), lambda m: minmax_grid(m, 3), percdamp=0.01)
    err_gptq = (x @ (grid.dequantize(q) - w).T).square().sum()
    qr, gr = rtn(w, 3)
    err_rtn = (x @ (gr.dequantize(qr) - w).T).square().sum()
    assert err_gptq < 0.5 * err_rtn


# ---- QMoE codec ----------------------------------------------------------------------------------------------

def test_codec_round_trips_losslessly_and_is_below_one_bit_on_iid_ternary():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(48, 512, generator=g)
    q = torch.where(u < 0.885, 1, torch.where(u < 0.9425, 0, 2))
    codes, offsets = encode_rows(q)
    assert codes.dtype == torch.int16 and offsets[-1] == codes.numel()
    assert torch.equal(decode_rows(codes, offsets, 512, build_codebook()), q)
    assert 16 * codes.numel() / q.numel() < 1.0


def test_codec_round_trips_any_ternary_matrix():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 3, (7, 29), generator=g)  # uniform (incompressible), odd width
    q[3] = 1  # an all-zero row
    codes, offsets = encode_rows(q)
    assert torch.equal(decode_rows(codes, offsets, 29, build_codebook()), q)
    one = torch.ones(1, 1, dtype=torch.long)
    assert torch.equal(decode_rows(*encode_rows(one), 1, build_codebook()), one)


# ---- calibration ---------------------------------------------------------------------------------------------

def test_calibration_records_each_experts_own_routed_tokens():
    model = tiny_lm()
    records = calibrate(model, tokens())
    assert list(records) == ["layers.0.ffn", "layers.1.ffn"]
    rec = records["layers.1.ffn"]
    moe = model.layers[1].ffn
    routing = moe.route(rec.x_TD)
    assert torch.equal(routing.expert_ids_TK, rec.expert_ids_TK)
    for e in range(8):
        mine = (rec.expert_ids_TK == e).any(1)
        assert torch.equal(rec.tokens_of(e), rec.x_TD[mine])
    assert rec.counts_E().sum() == rec.x_TD.shape[0] * 2
    assert torch.allclose(rec.frequency_E().sum(), torch.tensor(1.0))


def test_expert_without_tokens_falls_back_to_rtn():
    torch.manual_seed(0)
    moe = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2, router=RouterConfig(use_logit_bias=True))
    model = LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()
    with torch.no_grad():
        model.layers[0].ffn.router.bias[3] = -1e4  # expert 3 of layer 0 never receives a token
    assert calibrate(model, tokens())["layers.0.ffn"].counts_E()[3] == 0
    original = {k: v.clone() for k, v in expert_weights(model.layers[0].ffn.experts, 3).items()}
    compress(model, "gptq", tokens(), bits=4)
    got = model.layers[0].ffn.experts.weights(3)
    for m in ("w_gate", "w_up", "w_down"):
        q, grid = rtn(original[m], 4)
        assert torch.equal(model.layers[0].ffn.experts.codes(m, 3), q)
        assert torch.allclose(got[m], grid.dequantize(q), atol=1e-3 * float(original[m].abs().max()))


# ---- M-SMoE (spec §1) -------------------------------------------------------------------------------------------

def expert_dict(seed, F=12, D=6, gated=True):
    g = torch.Generator().manual_seed(seed)
    w = {"w_up": torch.randn(F, D, generator=g), "w_down": torch.randn(D, F, generator=g)}
    if gated:
        w["w_gate"] = torch.randn(F, D, generator=g)
    return w


def run_expert(w, x):
    h = torch.nn.functional.silu(x @ w["w_gate"].T) * (x @ w["w_up"].T)
    return h @ w["w_down"].T


def test_permutation_is_function_preserving_and_alignment_recovers_it():
    w = expert_dict(0)
    x = torch.randn(5, 6)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    permuted = permute_expert(w, perm)
    assert torch.allclose(run_expert(permuted, x), run_expert(w, x), atol=1e-5)
    assert torch.equal(align_neurons(w, w), torch.arange(12))
    back = align_neurons(w, permuted)
    assert torch.equal(permute_expert(permuted, back)["w_up"], w["w_up"])


def test_merging_identical_experts_one_permuted_returns_the_expert():
    w = expert_dict(1)
    permuted = permute_expert(w, torch.randperm(12, generator=torch.Generator().manual_seed(4)))
    aligned = permute_expert(permuted, align_neurons(w, permuted))
    merged = merge_weights([w, aligned], [0.3, 0.7])
    for m in w:
        assert torch.allclose(merged[m], w[m], atol=1e-5)


def test_frequency_weights_select_or_average():
    a, b = expert_dict(2), expert_dict(3)
    only_a = merge_weights([a, b], [1.0, 0.0])
    avg = merge_weights([a, b], [0.5, 0.5])
    for m in a:
        assert torch.allclose(only_a[m], a[m], atol=1e-6)
        assert torch.allclose(avg[m], (a[m] + b[m]) / 2, atol=1e-6)


def test_msmoe_keeps_router_bit_identical_and_groups_share_storage():
    model = tiny_lm()
    routers = [b.ffn.router.weight.detach().clone() for b in model.layers]
    report = compress(model, "m-smoe", tokens(), keep_experts=4)
    for block, before in zip(model.layers, routers):
        assert torch.equal(block.ffn.router.weight, before)
        bank = block.ffn.experts
        slots = bank.slot_to_stored_E
        for e in range(8):
            for f in range(8):
                same = bool(slots[e] == slots[f])
                ptr_e, ptr_f = bank.weights(e)["w_up"].data_ptr(), bank.weights(f)["w_up"].data_ptr()
                assert (ptr_e == ptr_f) == same
    assert sum(r["stored_experts"] for r in report.layers.values()) == pytest.approx(8, abs=1)
    assert torch.isfinite(logits(model, tokens(2))).all()


def test_global_group_counts_pool_frequencies():
    f1 = torch.tensor([0.5, 0.3, 0.1, 0.1])
    f2 = torch.tensor([0.25, 0.25, 0.25, 0.25])
    counts = global_group_counts([f1, f2], 2)
    assert all(c >= 1 for c in counts) and sum(counts) <= 4 + 1
    assert global_group_counts([f1, f2], 4) == [4, 4]


def test_lowrank_sparse_init_reconstructs():
    w = torch.randn(10, 14)
    L, R, S = lowrank_sparse_init(w, 3)
    assert L.shape == (10, 3) and R.shape == (3, 14)
    assert torch.allclose(L @ R + S, w, atol=1e-5)


# ---- baselines and the compressed layer ------------------------------------------------------------------------

def test_float_bank_with_all_experts_is_exact():
    model = tiny_lm(activation="gelu")
    t = tokens(3)
    before = logits(model, t)
    compress(model, "prune-frequency", tokens(), keep_experts=8)
    assert all(isinstance(b.ffn.experts, CompressedBank) for b in model.layers)
    assert torch.allclose(logits(model, t), before, atol=1e-5)


def test_pruning_drops_router_rows_and_lowers_top_k():
    model = tiny_lm()
    compress(model, "prune-frequency", tokens(), keep_experts=1)
    moe = model.layers[0].ffn
    assert moe.router.weight.shape[0] == 1 and moe.config.top_k == 1 and moe.experts.num_experts == 1
    assert torch.isfinite(logits(model, tokens(2))).all()


def test_int8_rtn_is_close_and_dequantises_per_expert():
    model = tiny_lm()
    t = tokens(3)
    before = logits(model, t)
    compress(model, "rtn", tokens(), bits=8)
    # int8 error is small; a rare near-tie in layer 1's top-k may flip, so compare the mean
    assert (logits(model, t) - before).abs().mean() < 0.02 * before.abs().mean()
    bank = model.layers[0].ffn.experts
    x = torch.randn(4, 16)
    w = bank.weights(2)
    ref = run_expert(w, x)
    assert torch.allclose(bank.expert(x, 2), ref, atol=1e-5)


def test_qmoe_ternary_rows_and_lossless_codec(tmp_path):
    model = tiny_lm(hidden_dim=40)
    compress(model, "qmoe", tokens(), bits=1.5, codec=False)
    t = tokens(2)
    before = logits(model, t)
    for block in model.layers:
        packed = block.ffn.experts
        coded = to_tunstall(packed)
        assert (coded.spec.format, packed.spec.format) == ("tunstall", "ternary")
        for e in range(8):
            for m in ("w_gate", "w_up", "w_down"):
                w = coded.matrix(m, e)
                assert torch.equal(w, packed.matrix(m, e))
                lo, hi = getattr(coded, f"{m}_lo")[e].float(), getattr(coded, f"{m}_hi")[e].float()
                assert ((w == lo[:, None]) | (w == 0) | (w == hi[:, None])).all()
        block.ffn.experts = coded
    assert torch.equal(logits(model, t), before)
    path = tmp_path / "coded.safetensors"
    artifact.save_compressed_state(model, path, artifact.header_of(model, "qmoe", {}))
    fresh = tiny_lm(hidden_dim=40, seed=3)
    artifact.load_compressed_state(fresh, path)
    assert fresh.layers[0].ffn.experts.spec.format == "tunstall"
    assert torch.equal(logits(fresh, t), before)


def test_qmoe_keeps_the_smaller_of_coded_and_packed():
    model = tiny_lm(hidden_dim=40)
    compress(model, "qmoe", tokens(), bits=1.5)
    for block in model.layers:
        bank = block.ffn.experts
        other = to_tunstall(bank) if bank.spec.format == "ternary" else None
        if other is not None:
            assert bank.stored_bytes() <= other.stored_bytes()


@pytest.mark.parametrize("bad, message", [({"keep_experts": 0}, "keep_experts=0"),
                                          ({"target_memory": 1.5}, "target_memory=1.5")])
def test_bad_targets_are_clear_errors(bad, message):
    with pytest.raises(CompressionError, match=message):
        compress(tiny_lm(), "m-smoe", tokens(), **bad)


def test_bad_method_calibration_and_model_are_clear_errors():
    with pytest.raises(CompressionError, match="unknown compression method 'qmo'.*did you mean 'qmoe'"):
        compress(tiny_lm(), "qmo", tokens())
    with pytest.raises(CompressionError, match="fewer than the 64 needed"):
        compress(tiny_lm(), "rtn", tokens(1, 8))
    with pytest.raises(CompressionError, match="has no moekit MoE layers"):
        compress(torch.nn.Linear(2, 2), "rtn", tokens())
    with pytest.raises(CompressionError, match="keep_experts=9 exceeds"):
        compress(tiny_lm(), "prune-frequency", tokens(), keep_experts=9)
    with pytest.raises(CompressionError, match="bits=5 is not supported"):
        compress(tiny_lm(), "rtn", tokens(), bits=5)
    with pytest.raises(CompressionError, match="drop keep_experts"):
        compress(tiny_lm(), "rtn", tokens(), keep_experts=4)
    with pytest.raises(CompressionError, match="drop bits"):
        compress(tiny_lm(), "m-smoe", tokens(), bits=4)
    model = tiny_lm()
    compress(model, "rtn", tokens(), bits=8)
    with pytest.raises(CompressionError, match="layers.0.ffn is already compressed"):
        compress(model, "gptq", tokens(), bits=4)


# ---- the artefact --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, opts", [("qmoe", {"bits": 1.5}), ("m-smoe", {"keep_experts": 3}),
                                          ("prune-frequency", {"keep_experts": 5}), ("gptq", {"bits": 3})])
def test_state_file_round_trip(tmp_path, method, opts):
    model = tiny_lm()
    report = compress(model, method, tokens(), **opts)
    t = tokens(2)
    out = logits(model, t)
    path = tmp_path / "c.safetensors"
    artifact.save_compressed_state(model, path, artifact.header_of(model, method, report.options))
    fresh = tiny_lm(seed=5)
    artifact.load_compressed_state(fresh, path)
    assert torch.equal(logits(fresh, t), out)


def test_loading_checks_shapes_and_version(tmp_path):
    model = tiny_lm()
    report = compress(model, "rtn", tokens(), bits=4)
    header = artifact.header_of(model, "rtn", report.options)
    path = tmp_path / "c.safetensors"
    artifact.save_compressed_state(model, path, {**header, "version": 99})
    with pytest.raises(CheckpointError, match="version 99"):
        artifact.load_compressed_state(tiny_lm(), path)
    bad = {**header, "layers": {k: {**v, "bank": {**v["bank"], "bits": 3}} for k, v in header["layers"].items()}}
    artifact.save_compressed_state(model, path, bad)
    with pytest.raises(CheckpointError, match=r"w_\w+_planes' is \(8, 4, "):
        artifact.load_compressed_state(tiny_lm(), path)


# ---- EAQuant (spec §5) ---------------------------------------------------------------------------------------

def test_eaquant_smoothing_is_an_exact_reparameterisation():
    from moekit.compression.eaquant import apply_smoothing, smoothing_scales
    model = tiny_lm()
    t = tokens(3)
    before = logits(model, t)
    records = calibrate(model, tokens())
    for block in model.layers:
        moe = block.ffn
        rec = records[f"layers.{block.index}.ffn"]
        weights = [expert_weights(moe.experts, e) for e in range(8)]
        s_D, per_ED = smoothing_scales(weights, rec)
        assert (s_D[None] >= per_ED).all()  # max aggregation dominates every expert's own scale
        x = rec.x_TD[:20]
        router_before = moe.router.logits(x)
        outs_before = [moe.experts.expert(x, e) for e in range(8)]
        apply_smoothing(moe, block.ffn_norm, s_D)
        assert torch.allclose(moe.router.logits(x / s_D), router_before, atol=1e-4)
        for e in range(8):
            assert torch.allclose(moe.experts.expert(x / s_D, e), outs_before[e], atol=1e-4)
    assert torch.allclose(logits(model, t), before, atol=1e-4)


def test_router_kl_is_zero_for_identity_and_reads_only_fp_topk():
    from moekit.compression.eaquant import router_topk_kl
    z = torch.randn(30, 8)
    assert router_topk_kl(z, z, 2) == 0
    top = torch.softmax(z, -1).topk(2, -1).indices
    other = z.clone()
    for t in range(30):  # permute the entries outside the FP top-k: the softmax at the top-k is unchanged
        rest = [e for e in range(8) if e not in top[t].tolist()]
        other[t, rest] = z[t, rest[1:] + rest[:1]]
    assert not torch.equal(other, z)
    assert abs(float(router_topk_kl(z, other, 2))) < 1e-6
    worse = z.clone()
    worse.scatter_(1, top[:, :1], -5.0)
    assert router_topk_kl(z, worse, 2) > 0


def test_eaquant_caps_each_experts_tokens_and_uses_the_layer_input_for_empty_experts():
    from moekit.compression.eaquant import balanced_tokens
    torch.manual_seed(0)
    moe = MoEConfig(dim=16, hidden_dim=24, num_experts=8, top_k=2, router=RouterConfig(use_logit_bias=True))
    model = LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()
    with torch.no_grad():
        model.layers[0].ffn.router.bias[5] = -1e4
    rec = calibrate(model, tokens())["layers.0.ffn"]
    T, K = rec.expert_ids_TK.shape
    cap = int(2.0 * T * K / 8)
    for e in range(8):
        x = balanced_tokens(rec, e)
        if e == 5:
            assert torch.equal(x, rec.x_TD)
        else:
            assert 0 < x.shape[0] <= cap
            assert torch.equal(x, rec.tokens_of(e)[:cap])


def test_eaquant_w4_beats_rtn_w4_on_the_output():
    t = tokens(4)
    ref = logits(tiny_lm(), t)
    ea, plain = tiny_lm(), tiny_lm()
    compress(ea, "eaquant", tokens(), bits=4)
    compress(plain, "rtn", tokens(), bits=4)
    assert (logits(ea, t) - ref).square().mean() < (logits(plain, t) - ref).square().mean()


# ---- DERN (spec §2) ------------------------------------------------------------------------------------------

def test_dern_keeping_all_experts_is_identical():
    model = tiny_lm()
    t = tokens(3)
    before = logits(model, t)
    compress(model, "dern", tokens(), keep_experts=8)
    assert torch.allclose(logits(model, t), before, atol=1e-5)


def test_dern_alpha_above_one_is_importance_pruning():
    a, b = tiny_lm(), tiny_lm()
    compress(a, "dern", tokens(), keep_experts=3, alpha=1.5)
    records = calibrate(tiny_lm(), tokens())
    for block in b.layers:
        imp = records[f"layers.{block.index}.ffn"].importance_E()
        kept = sorted(sorted(range(8), key=lambda i: (-float(imp[i]), i))[:3])
        from moekit.compression.surgery import install_bank, prune_router
        w = [expert_weights(block.ffn.experts, i) for i in kept]
        prune_router(block.ffn, kept)
        install_bank(block.ffn, CompressedBank.from_float({m: torch.stack([x[m] for x in w]) for m in w[0]},
                                                          torch.arange(3), activation="swiglu"))
    t = tokens(3)
    assert torch.allclose(logits(a, t), logits(b, t), atol=1e-6)
    assert all(blk.ffn.experts.num_experts == 3 and blk.ffn.experts.hidden_dim == 24 for blk in a.layers)


def test_dern_segments_sum_to_the_expert_and_kmeans_over_own_segments_is_identity():
    from moekit.compression.dern import from_segments, segments, spherical_kmeans
    w = expert_dict(5)
    x = torch.randn(4, 6)
    seg = segments(w)
    parts = sum(run_expert(from_segments(seg[j:j + 1], 6, True), x) for j in range(12))
    assert torch.allclose(parts, run_expert(w, x), atol=1e-5)
    centroids, assign = spherical_kmeans(seg, torch.ones(12), seg[:, :6].abs().amax(1), 12)
    assert sorted(assign.tolist()) == list(range(12))  # one segment per cluster
    assert torch.allclose(centroids[assign], seg, atol=1e-5)  # each centroid is its segment (a neuron permutation)


def test_dern_recombines_a_permuted_twin_into_the_kept_expert():
    from moekit.compression.dern import (
        from_segments,
        recombine,
        segments,
        transfer_segments,
    )
    w = expert_dict(6)
    twin = permute_expert(w, torch.randperm(12, generator=torch.Generator().manual_seed(7)))
    other = expert_dict(8)
    kept, dropped = [segments(w), segments(other)], [segments(twin)]
    received, cosines = transfer_segments(kept, dropped, 6, True, alpha=0.5)
    assert len(received[0]) == 12 and not received[1]
    assert all(abs(c - 1) < 1e-5 for c in cosines[0])
    got = torch.stack([dropped[0][j] for _, j in received[0]])
    merged = from_segments(recombine(kept[0], got, 0.6, torch.full((12,), 0.2), 6, True), 6, True)
    x = torch.randn(5, 6)
    assert torch.allclose(run_expert(merged, x), run_expert(w, x), atol=1e-4)


# ---- D²MoE MWQ (spec §7) -------------------------------------------------------------------------------------

def test_mwq_levels_differ_by_one_signed_plane_and_error_never_grows():
    from moekit.compression.mwq import mwq_quantize, output_error
    torch.manual_seed(0)
    x = torch.randn(300, 8) @ torch.randn(8, 200) + 0.1 * torch.randn(300, 200)
    w = torch.randn(12, 200)
    h = x.T @ x
    q = mwq_quantize(w, h, bits=2, levels=3, group_size=64, blocksize=64)
    errors = []
    for k in range(4):
        errors.append(output_error(w, q.reconstruct(k), h))
        if k:
            diff = q.reconstruct(k) - q.reconstruct(k - 1)
            step = q.rscale_LRN[k - 1].repeat_interleave(64, dim=-1)[:, :200] * q.signs_LRC[k - 1]
            assert torch.allclose(diff, step, atol=1e-5)
            assert set(q.signs_LRC[k - 1].unique().tolist()) <= {-1.0, 1.0}
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.2 * errors[0]


def test_mwq_bank_prefixes_are_valid_experts_and_storage_grows_one_plane_per_level(tmp_path):
    sizes = []
    for levels in (0, 1, 2):
        model = tiny_lm()
        compress(model, "d2moe-mwq", tokens(), bits=2, levels=levels)
        bank = model.layers[0].ffn.experts
        sizes.append(sum(getattr(bank, f"{m}_planes").numel() for m in ("w_gate", "w_up", "w_down")))
    one_plane = 8 * (24 * 2 + 24 * 2 + 16 * 3)  # G x (rows x ceil(cols / 8)) for w_gate, w_up, w_down
    assert sizes[1] - sizes[0] == sizes[2] - sizes[1] == one_plane
    model = tiny_lm()
    t = tokens(2)
    ref = logits(model, t)
    compress(model, "d2moe-mwq", tokens(), bits=2, levels=2)
    errs = []
    for k in (0, 1, 2):
        for block in model.layers:
            block.ffn.experts.active_levels = k
        errs.append(float((logits(model, t) - ref).square().mean()))
    assert errs[2] < errs[0] and all(math.isfinite(v) for v in errs)
    path = tmp_path / "m.safetensors"
    artifact.save_compressed_state(model, path, artifact.header_of(model, "d2moe-mwq", {}))
    fresh = tiny_lm(seed=4)
    artifact.load_compressed_state(fresh, path)
    assert torch.equal(logits(fresh, t), logits(model, t))


# ---- Expert Merging / ++ (spec §3) -------------------------------------------------------------------------------

def test_expert_merging_init_single_expert_and_gradients():
    from moekit.compression.expert_merging import MergeCoefficients, merge_tensor
    base, a, b = expert_dict(10), expert_dict(11), expert_dict(12)
    coefs = MergeCoefficients(list(base), 2, {})
    for n in base:
        taus = [a[n] - base[n], b[n] - base[n]]
        assert torch.allclose(merge_tensor(base[n], taus, coefs.coef(n)), base[n] + 0.1 * (taus[0] + taus[1]),
                              atol=1e-6)
        assert torch.allclose(merge_tensor(base[n], [a[n] - base[n]], torch.ones(1, 1)), a[n], atol=1e-6)
    x = torch.randn(6, 6)
    merged = {n: merge_tensor(base[n], [a[n] - base[n], b[n] - base[n]], coefs.coef(n)) for n in base}
    run_expert(merged, x).square().sum().backward()
    assert [p for p in coefs.parameters()] and all(p.requires_grad for p in coefs.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in coefs.parameters())
    assert all(not t.requires_grad for t in (*base.values(), *a.values()))


def test_expert_merging_chunks_follow_torch_chunk():
    from moekit.compression.expert_merging import merge_tensor
    base, tau = torch.randn(5, 7), torch.randn(5, 7)
    one = merge_tensor(base, [tau], torch.tensor([[0.3]]))
    assert torch.allclose(one, base + 0.3 * tau)
    coef = torch.tensor([[0.2, 0.5, 0.9]])
    got = merge_tensor(base, [tau], coef).reshape(-1) - base.reshape(-1)
    for c, chunk in zip(coef[0], torch.chunk(torch.arange(35), 3)):
        assert torch.allclose(got[chunk], c * tau.reshape(-1)[chunk])


def test_expert_merging_pp_allocation():
    from moekit.compression.expert_merging import (
        MergeCoefficients,
        allocate_chunks,
        unit_importance,
    )
    taus = {"a": [torch.ones(4, 4)], "b": [3 * torch.ones(4, 4)], "c": [torch.zeros(4, 4)]}
    coefs = {n: torch.full((1, 1), 0.5) for n in taus}
    imp = unit_importance(coefs, taus)
    assert all(v >= 0 for v in imp.values()) and abs(sum(imp.values()) - 1) < 1e-9
    assert imp["b"] == pytest.approx(0.75)
    assert allocate_chunks(imp, 9, kappa=0) == {"a": 3, "b": 3, "c": 3}
    chunks = allocate_chunks(imp, 4, kappa=2)
    assert chunks["b"] > chunks["a"] and chunks["c"] == 0
    m = MergeCoefficients(list(taus), 1, chunks, fixed={"c": torch.full((1, 1), 0.2)})
    assert "c" not in dict(m.named_parameters()) and torch.equal(m.coef("c"), torch.full((1, 1), 0.2))


@pytest.mark.parametrize("method", ["expert-merging", "expert-merging++"])
def test_expert_merging_methods_run_and_beat_plain_averaging(method):
    t = tokens(4)
    ref = logits(tiny_lm(), t)
    learned, avg = tiny_lm(), tiny_lm()
    compress(learned, method, tokens(), keep_experts=4, merge_steps=30)
    compress(avg, "merge-random", tokens(), keep_experts=4)
    assert torch.isfinite(logits(learned, t)).all()
    assert (logits(learned, t) - ref).square().mean() < (logits(avg, t) - ref).square().mean()
