"""QMoE's codec with a dictionary fitted to the measured symbol frequencies (spec §4, format ``tunstall-fit``):
lossless round trips, row boundaries recovered from codeword lengths, fewer bits than the paper's fixed
dictionary when the zero fraction differs from 0.885, and the artefact round trip."""

import math

import pytest
import torch

from moekit import MoEConfig
from moekit.compression import artifact, codec
from moekit.compression.api import compress
from moekit.compression.codec import (
    build_codebook,
    decode_matrix,
    decode_rows,
    encode_matrix,
    encode_rows,
    paper_probabilities,
    row_offsets,
    segment_rows,
    symbol_probabilities,
    to_tunstall,
)
from moekit.models import LanguageModel, ModelConfig
from moekit.training.checkpoint import CheckpointError


def iid_ternary(rows, cols, p_zero, seed=0):
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    return torch.where(u < p_zero, 1, torch.where(u < (1 + p_zero) / 2, 0, 2))


def entropy_bits(p_zero):
    p = (1 - p_zero) / 2
    return -(p_zero * math.log2(p_zero) + 2 * p * math.log2(p))


def test_paper_probabilities_reproduce_the_default_dictionary():
    assert torch.equal(build_codebook(paper_probabilities()), build_codebook())
    assert math.isclose(sum(paper_probabilities()), 1.0)
    assert paper_probabilities()[4] == pytest.approx(0.885 ** 2)


def test_symbol_probabilities_count_pairs_with_add_one_smoothing():
    q = torch.tensor([[1, 1, 0, 2, 1]])  # symbols (1,1)=4, (0,2)=2, (1, pad 1)=4
    p = symbol_probabilities(q)
    expected = torch.ones(9)
    expected[4] += 2
    expected[2] += 1
    assert torch.allclose(p, expected / expected.sum())


@pytest.mark.parametrize("p_zero, margin", [(0.75, 0.03), (0.82, 0.005)])
def test_fitted_dictionary_beats_the_paper_one_when_zeros_are_rarer_than_885(p_zero, margin):
    q = iid_ternary(64, 512, p_zero)
    probs = symbol_probabilities(q)
    fitted, off_fit = encode_rows(q, probs)
    paper, off_paper = encode_rows(q)
    assert torch.equal(decode_rows(fitted, off_fit, 512, build_codebook(probs)), q)
    assert torch.equal(decode_rows(paper, off_paper, 512, build_codebook()), q)
    bits_fit, bits_paper = 16 * fitted.numel() / q.numel(), 16 * paper.numel() / q.numel()
    assert bits_fit < bits_paper - margin
    # 2^16 words of at most 14 pairs: within 10% of the entropy (measured: 7.4% at P(0)=0.75, 9.7% at 0.82)
    assert bits_fit < 1.11 * entropy_bits(p_zero)


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (32, 29), (48, 64)])
def test_segment_coded_matrix_round_trips_and_saves_the_row_padding(rows, cols):
    q = iid_ternary(rows, cols, 0.85, seed=rows)
    q[0] = 1
    probs = symbol_probabilities(q)
    book = build_codebook(probs)
    stream = encode_matrix(q, probs)
    assert torch.equal(decode_matrix(stream, rows, cols, book), q)
    assert segment_rows(rows) == {1: 1, 3: 1, 32: 16, 48: 16}[rows]
    per_row, _ = encode_rows(q, probs)
    assert stream.numel() <= per_row.numel()
    if rows >= 32:
        assert stream.numel() < per_row.numel()


@pytest.mark.parametrize("cols", [1, 2, 29, 512])
def test_row_offsets_recover_the_encoders_offsets(cols):
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(0, 3, (9, cols), generator=g)
    q[2] = 1  # all zero: one long codeword per row
    q[5, : cols // 2] = 1
    for probs in (None, symbol_probabilities(q)):
        codes, offsets = encode_rows(q, probs)
        book = build_codebook(probs)
        assert torch.equal(row_offsets(codes, 9, cols, book), offsets)


def test_row_offsets_reject_truncated_or_overlong_streams():
    q = iid_ternary(6, 40, 0.8)
    codes, _ = encode_rows(q)
    book = build_codebook()
    with pytest.raises(CheckpointError, match="ends inside row"):
        row_offsets(codes[:-1], 6, 40, book)
    with pytest.raises(CheckpointError, match="after its 6 rows"):
        row_offsets(torch.cat([codes, codes[:1]]), 6, 40, book)


def test_dictionary_is_regrown_identically_from_the_stored_probabilities():
    probs = symbol_probabilities(iid_ternary(8, 64, 0.7, seed=2))
    first = build_codebook(probs)
    codec._trie.cache_clear()
    codec._book.cache_clear()
    assert torch.equal(build_codebook(probs.clone()), first)


def test_bad_symbol_probabilities_are_named():
    with pytest.raises(CheckpointError, match="9 positive finite"):
        build_codebook(torch.zeros(9))


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(dim=16, hidden_dim=40, num_experts=8, top_k=2, activation="swiglu")
    return LanguageModel(ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, context=16, moe=moe)).eval()


def tokens(n=12, s=16, seed=1):
    return torch.randint(0, 40, (n, s), generator=torch.Generator().manual_seed(seed))


def logits(model, t):
    with torch.no_grad():
        return model(t)[0]


def test_fitted_bank_is_lossless_smaller_than_paper_layout_and_survives_the_artefact(tmp_path):
    model = tiny_lm()
    compress(model, "qmoe", tokens(), bits=1.5, codec=False)
    t = tokens(2)
    before = logits(model, t)
    for block in model.layers:
        packed = block.ffn.experts
        fitted, paper = to_tunstall(packed, fit=True), to_tunstall(packed)
        assert fitted.spec.format == "tunstall-fit" and fitted.codebook is None
        assert not any(n.endswith("_counts") for n, _ in fitted.named_buffers())
        assert fitted.stored_bytes() < paper.stored_bytes()
        for e in range(8):
            for m in ("w_gate", "w_up", "w_down"):
                assert torch.equal(fitted.matrix(m, e), packed.matrix(m, e))
        block.ffn.experts = fitted
    assert torch.equal(logits(model, t), before)
    path = tmp_path / "fit.safetensors"
    artifact.save_compressed_state(model, path, artifact.header_of(model, "qmoe", {}))
    codec._book.cache_clear()
    fresh = tiny_lm(seed=3)
    artifact.load_compressed_state(fresh, path)
    assert fresh.layers[1].ffn.experts.spec.format == "tunstall-fit"
    assert torch.equal(logits(fresh, t), before)


def test_qmoe_uses_the_fitted_codec_by_default_and_the_paper_one_on_request():
    for fit, fmt in ((True, "tunstall-fit"), (False, "tunstall")):
        model = tiny_lm()
        compress(model, "qmoe", tokens(), bits=1.5, fit_codebook=fit)
        formats = {b.ffn.experts.spec.format for b in model.layers}
        assert formats <= {fmt, "ternary"}
