"""EAQuant's activation quantisation (W4A8 / W4A4, with and without the block-Hadamard rotation) against RTN on an
MoE run, and MoTE (``--method mote``) on a dense run: Δ bits/byte vs float and bits per expert parameter on disk.

    python benchmarks/compress_actquant_mote.py --moe RUN --dense RUN [--mote-steps 50] [--kl] [--out results.json]

Every figure is one evaluation of the run's validation batches (its ``train.eval_batches``); the calibration
tokens come from the training split. MoTE is evaluated three ways: the dense run it starts from, MoTE at
upcycling (no QAT step: ternarised copies of the FFN beside the frozen FFN), and after ``--mote-steps`` QAT steps
(saved as a compressed run folder and reloaded from disk, so the figure is the artefact's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.bench.timing import run_environment
from moekit.compression.api import compress
from moekit.compression.mote import compress_mote_run, upcycle_to_mote
from moekit.compression.runs import calibration_tokens, format_table, sweep_run
from moekit.data import load_data, val_batches
from moekit.training import load_run
from moekit.training.evaluate import evaluate

POINTS = [
    ("rtn", {"bits": 4}), ("eaquant", {"bits": 4}),
    ("rtn", {"bits": 4, "act_bits": 8}), ("eaquant", {"bits": 4, "act_bits": 8}),
    ("rtn", {"bits": 4, "act_bits": 8, "rotate": True}), ("eaquant", {"bits": 4, "act_bits": 8, "rotate": True}),
    ("rtn", {"bits": 4, "act_bits": 4}), ("eaquant", {"bits": 4, "act_bits": 4}),
    ("rtn", {"bits": 4, "act_bits": 4, "rotate": True}), ("eaquant", {"bits": 4, "act_bits": 4, "rotate": True}),
]


def bpb(model, cfg, data) -> float:
    return evaluate(model, data, batch_size=cfg.train.batch_size, num_batches=cfg.train.eval_batches,
                    device="cpu")["val_bpb"]


@torch.no_grad()
def logit_kl(run: str, num_tokens: int, batches: int = 2) -> list[dict]:
    """Mean per-token ``KL(p_float ‖ p_compressed)`` (nats) of the next-token distributions on validation windows:
    far more sensitive than bits/byte on a 16 KB validation split."""
    cfg, model, _ = load_run(run, "cpu")
    data = load_data(cfg.data)
    calib = calibration_tokens(cfg, data, num_tokens)
    windows = [x for x, _ in val_batches(data, cfg.train.batch_size, cfg.model.context, batches)]
    ref = [torch.log_softmax(model(x)[0].float(), -1) for x in windows]
    rows = []
    for method, opts in POINTS:
        _, m, _ = load_run(run, "cpu")
        compress(m, method, calib, **opts)
        kl = [torch.sum(r.exp() * (r - torch.log_softmax(m(x)[0].float(), -1)), -1).mean()
              for r, x in zip(ref, windows, strict=True)]
        rows.append({"method": method, "setting": ", ".join(f"{k}={v}" for k, v in opts.items()),
                     "kl_nats": float(sum(kl) / len(kl))})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe", help="an MoE run (e.g. a short default run)")
    p.add_argument("--dense", help="a dense run (moekit train --preset dense)")
    p.add_argument("--mote-steps", type=int, default=50)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--kl", action="store_true", help="also the logit KL to the float model of every --moe point")
    p.add_argument("--no-sweep", action="store_true", help="skip the bits/byte sweep of --moe")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    result: dict = {}
    if args.moe and args.kl:
        result["kl"] = logit_kl(args.moe, args.calibration_tokens)
    if args.moe and not args.no_sweep:
        with tempfile.TemporaryDirectory() as tmp:
            rows = sweep_run(args.moe, tmp, points=POINTS, num_tokens=args.calibration_tokens, plot=False)
        print(format_table(rows), flush=True)
        result["actquant"] = rows
    if args.dense:
        cfg, dense, _ = load_run(args.dense, "cpu")
        data = load_data(cfg.data)
        base = bpb(dense, cfg, data)
        torch.manual_seed(0)
        init = bpb(upcycle_to_mote(dense, 4).eval(), cfg, data)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "mote"
            t0 = time.perf_counter()
            torch.manual_seed(0)
            report, _ = compress_mote_run(args.dense, out, steps=args.mote_steps)
            seconds = time.perf_counter() - t0
            _, loaded, _ = load_run(out, "cpu")
            after = bpb(loaded, cfg, data)
            disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        result["mote"] = {"dense_bpb": base, "mote_init_bpb": init, "mote_qat_bpb": after,
                          "delta_init": init - base, "delta_qat": after - base, "steps": args.mote_steps,
                          "qat_seconds": seconds, "expert_params": report.expert_params,
                          "expert_bytes": report.bytes_after, "bits_per_expert_param": report.bits_per_param,
                          "folder_bytes": disk}
        print(json.dumps(result["mote"], indent=2), flush=True)
    if args.out:
        result["environment"] = run_environment("cpu")
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
