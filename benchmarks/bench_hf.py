"""transformers' experts implementation vs the same model patched by ``moekit.hf.patch``, in one process.

Small-but-not-trivial random Mixtral and Qwen3-MoE models (4 layers, 16 / 32 experts) are built from their
config classes; the patched copy shares their weights' values. For forward (inference, no grad) and
forward+backward (training mode, language-model loss plus aux loss), A and B runs alternate after warm-up and
the medians are compared: ``speedup = time(transformers) / time(moekit)``. ``model`` rows time the whole
model; ``block`` rows time its first sparse-MoE block alone on a fixed input (loss = mean square).

    python benchmarks/bench_hf.py                     # about a minute on one CPU thread
    python benchmarks/bench_hf.py --eager             # also time transformers' eager loop
    python benchmarks/bench_hf.py --json bench_out/bench_hf.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moekit.hf as mh  # noqa: E402
from moekit.bench.timing import run_environment  # noqa: E402
from moekit.dispatch import resolve_engine  # noqa: E402
from moekit.hf.tiny import tiny_model  # noqa: E402

MODELS = {
    "mixtral": dict(dim=256, hidden_dim=512, num_experts=16, top_k=2, num_layers=4, num_heads=8, vocab_size=1024),
    "qwen3_moe": dict(dim=256, hidden_dim=256, num_experts=32, top_k=4, num_layers=4, num_heads=8,
                      vocab_size=1024),
}


class BlockOnly(torch.nn.Module):
    """The first sparse-MoE block of a model on a fixed ``[B, S, D]`` input: the MoE layer without the rest."""

    def __init__(self, model, x_BSD: torch.Tensor) -> None:
        super().__init__()
        self.block = next(m for m in model.modules()
                          if isinstance(m, mh.PatchedMoEBlock) or mh.adapter_for(m) is not None)
        self.x = x_BSD

    def forward(self, ids, labels=None, output_router_logits=False):
        x = self.x.requires_grad_(labels is not None)
        out = self.block(x)
        out = out[0] if isinstance(out, tuple) else out
        return type("Out", (), {"loss": out.square().mean(), "logits": out})()


def step(model, ids, backward: bool) -> None:
    if backward:
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, ids, backward: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is less sensitive to other load."""
    _sync(ids.device)
    t, c = time.perf_counter(), time.process_time()
    step(model, ids, backward)
    _sync(ids.device)
    return time.perf_counter() - t, time.process_time() - c


def compare(variants: dict, ids, backward: bool, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per variant, runs alternating A, B, A, B... after warm-up."""
    for model in variants.values():
        model.train(backward)
        for _ in range(warmup):
            step(model, ids, backward)
    times = {name: [] for name in variants}
    for _ in range(repeats):  # alternate so that load changes on a shared machine hit every variant alike
        for name, model in variants.items():
            times[name].append(timed(model, ids, backward))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant (default 7)")
    p.add_argument("--eager", action="store_true", help="also time transformers' eager experts loop")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, OpenMP barriers of several threads stall "
                        "whenever one thread is descheduled, which swamps the comparison; 0 = torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--scale", type=int, default=1, help="multiply dim and hidden_dim (e.g. 4 on a GPU)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for arch, sizes in MODELS.items():
        sizes = {**sizes, "dim": sizes["dim"] * args.scale, "hidden_dim": sizes["hidden_dim"] * args.scale}
        base = tiny_model(arch, **sizes, init_std=0.05).to(device, dtype)
        default_impl = base.config._experts_implementation
        variants = {f"transformers[{default_impl}]": base}
        if args.eager:
            variants["transformers[eager]"] = tiny_model(arch, **sizes, init_std=0.05,
                                                          experts_implementation="eager").to(device, dtype)
        variants["moekit[auto]"] = mh.patch(copy.deepcopy(base))
        ids = torch.randint(0, sizes["vocab_size"], (args.batch, args.seq),
                            generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            ref = base(ids).logits
            for name, model in variants.items():
                diff = (model(ids).logits - ref).abs().max().item()
                tol = 1e-3 if dtype == torch.float32 else 0.25 * ref.abs().max().item()
                assert diff < tol, f"{name} disagrees with transformers by {diff}"
                print(f"{arch:<10} {name:<26} max |logits - transformers| = {diff:.3g}", flush=True)
        x = torch.randn(args.batch, args.seq, sizes["dim"], generator=torch.Generator().manual_seed(1)).to(device, dtype)
        blocks = {name: BlockOnly(model, x) for name, model in variants.items()}
        for scope, backward in (("model", False), ("model", True), ("block", False), ("block", True)):
            med = compare(variants if scope == "model" else blocks, ids, backward, args.warmup, args.repeats)
            ref_wall, ref_cpu = med[f"transformers[{default_impl}]"]
            for name, (wall, cpu) in med.items():
                rows.append({"model": arch, "scope": scope, "experts": sizes["num_experts"], "top_k": sizes["top_k"],
                             "pass": "fwd+bwd" if backward else "fwd", "variant": name,
                             "median_wall_ms": 1e3 * wall, "median_cpu_ms": 1e3 * cpu,
                             "speedup_wall": ref_wall / wall, "speedup_cpu": ref_cpu / cpu})
                r = rows[-1]
                print(f"{arch:<10} {scope:<6} E={r['experts']:<3} k={r['top_k']}  {r['pass']:<8} {name:<26} wall "
                      f"{r['median_wall_ms']:8.1f} ms x{r['speedup_wall']:.2f}   cpu {r['median_cpu_ms']:8.1f} ms "
                      f"x{r['speedup_cpu']:.2f}", flush=True)
    env = run_environment(device)
    moe = next(m.moe for m in variants["moekit[auto]"].modules() if isinstance(m, mh.PatchedMoEBlock))
    engines = resolve_engine(moe.config.engine, x.view(-1, x.shape[-1]), moe.experts).name
    meta = {"device": env["device"], "dtype": args.dtype, "threads": torch.get_num_threads(), "moekit_engine": engines,
            "load_avg": os.getloadavg(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "tokens_per_step": args.batch * args.seq,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps({"meta": meta, "environment": env}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
