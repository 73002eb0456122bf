"""QMoE ternary on a trained run: bits per expert parameter with the paper's fixed dictionary (``tunstall``) and
with dictionaries fitted to the measured symbol frequencies (``tunstall-fit``), per matrix, and Δ bits/byte.

    python benchmarks/compress_qmoe_bits.py RUN_DIR [--calibration-tokens 8192] [--out results.json]

Compresses once with ``codec=False`` (ternary GPTQ, 2-bit packed), then re-stores the same codes both ways
(lossless, so both have the ternary model's bits/byte) and writes the fitted run folder to measure its size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench.timing import run_environment
from moekit.compression import compress
from moekit.compression.artifact import header_of, save_compressed_run
from moekit.compression.calibrate import find_moe_layers
from moekit.compression.codec import to_tunstall
from moekit.compression.runs import calibration_tokens
from moekit.data import load_data
from moekit.training import load_run
from moekit.training.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg, model, state = load_run(args.run, "cpu")
    data = load_data(cfg.data)
    nb = cfg.train.eval_batches

    def bpb(m) -> float:
        return evaluate(m, data, batch_size=cfg.train.batch_size, num_batches=nb, device="cpu")["val_bpb"]

    base = bpb(model)
    report = compress(model, "qmoe", calibration_tokens(cfg, data, args.calibration_tokens), bits=1.5, codec=False)
    params = report.expert_params
    ternary_bpb = bpb(model)
    per_matrix: dict[str, dict[str, float]] = {}
    totals = {"ternary": 0, "tunstall": 0, "tunstall-fit": 0}
    for _, moe in find_moe_layers(model):
        packed = moe.experts
        paper, fitted = to_tunstall(packed), to_tunstall(packed, fit=True)
        for name, bank in (("ternary", packed), ("tunstall", paper), ("tunstall-fit", fitted)):
            totals[name] += bank.stored_bytes()
        s = packed.spec
        for m, (R, C) in s.matrices().items():
            q = torch.cat([packed.codes(m, g) for g in range(s.num_stored)])
            row = per_matrix.setdefault(m, {"weights": 0, "zeros": 0, "paper_bits": 0, "fit_bits": 0, "rows": 0})
            row["weights"] += q.numel()
            row["zeros"] += int((q == 1).sum())
            row["rows"] += s.num_stored * R
            row["paper_bits"] += 16 * getattr(paper, f"{m}_codes").numel()
            row["fit_bits"] += 16 * getattr(fitted, f"{m}_codes").numel()
        moe.experts = fitted
    fit_bpb = bpb(model)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_compressed_run(Path(tmp) / "qmoe", cfg, model, header_of(model, "qmoe", report.options),
                                  {"step": state["step"]})
        file_bytes = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    res = {
        "environment": run_environment("cpu"),
        "float_bpb": base, "ternary_bpb": ternary_bpb, "fitted_bpb": fit_bpb, "delta_bpb": fit_bpb - base,
        "expert_params": params,
        "bits_per_param": {k: 8 * v / params for k, v in totals.items()},
        "paper_codebook_bytes": 65529 * 15,
        "fitted_run_safetensors_bytes": file_bytes,
        "per_matrix": {m: {"zero_fraction": r["zeros"] / r["weights"],
                           "paper_stream_bits_per_weight": r["paper_bits"] / r["weights"],
                           "fit_stream_bits_per_weight": r["fit_bits"] / r["weights"],
                           "extremes_bits_per_weight": 32 * r["rows"] / r["weights"]}
                       for m, r in per_matrix.items()},
    }
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
