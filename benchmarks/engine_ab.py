"""The CPU expert computation of the ``sorted`` and ``sorted_blocked`` engines, A/B on layer shapes (issue 20).

    PYTHONPATH=. python benchmarks/engine_ab.py [--shapes default fine-s mid coarse mixtral-s] [--repeats 10]
        [--threads 1] [--clock cpu] [--blocks none 512] [--uneven 0.5] [--out docs/bench/engine_ab.json]

Times forward+backward of :func:`moekit.ops.sorted_moe_ffn` (the ``sorted`` engine) and
:func:`moekit.ops.blocked_moe_ffn` with one block per expert segment (``none``) and with blocks of at most N rows,
on the same inputs, alternated (A B C A B C ..., medians; :func:`moekit.bench.timing.alternate`), and prints each
one's time as a ratio to ``sorted``. The routing is a seeded softmax top-k over random logits (segments near
``T*K/E`` rows; ``--uneven SD`` adds a seeded per-expert logit bias of that sd, for uneven segments as in training).
Before timing, every candidate's output and gradients are checked against ``sorted``'s.

Shapes (tokens, dim, experts, expert hidden, top-k): ``default`` is the ``default`` preset's layer (32 x 128,
top-7; its shared expert is not part of the engine), ``fine-s`` and ``mixtral-s`` are ``moekit bench``'s,
``mid`` is 16 x 256 top-3 and ``coarse`` the ``coarse`` preset's 8 x 512 top-2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

from moekit.bench.layer import SHAPES as LAYER_SHAPES
from moekit.bench.timing import alternate, run_environment
from moekit.ops import blocked_moe_ffn, sorted_moe_ffn
from moekit.runtime import tune_cpu_allocator
from moekit.training.runfiles import write_json


def _bench_shape(name: str) -> tuple[int, int, int, int, int]:
    s = LAYER_SHAPES[name]  # moekit bench's shape (its shared expert is not part of the engine)
    return s.tokens, s.dim, s.num_experts, s.hidden_dim, s.top_k


SHAPES = {  # name: (tokens, dim, experts, hidden, top_k)
    "default": (4096, 256, 32, 128, 7),
    "fine-s": _bench_shape("fine-s"),
    "mid": (4096, 256, 16, 256, 3),
    "coarse": (4096, 256, 8, 512, 2),
    "mixtral-s": _bench_shape("mixtral-s"),
}


def _inputs(T: int, D: int, E: int, F: int, K: int, seed: int = 0, uneven: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    w_gate = (torch.randn(E, F, D, generator=g) / D ** 0.5).requires_grad_()
    w_up = (torch.randn(E, F, D, generator=g) / D ** 0.5).requires_grad_()
    w_down = (torch.randn(E, D, F, generator=g) / F ** 0.5).requires_grad_()
    bias_E = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1)) * uneven
    weights_TK, ids_TK = (torch.randn(T, E, generator=g) + bias_E).softmax(-1).topk(K, dim=-1)
    order_N = torch.argsort(ids_TK.reshape(-1), stable=True)
    counts = torch.bincount(ids_TK.reshape(-1), minlength=E).tolist()
    weights_N = weights_TK.reshape(-1)[order_N].clone().requires_grad_()
    grad_y = torch.randn(T, D, generator=g)
    return (x, weights_N, order_N // K, counts, w_gate, w_up, w_down), grad_y


def _candidate(blocks: str | None, args, grad_y):
    x, weights_N, token_N, counts, w_gate, w_up, w_down = args
    leaves = (x, weights_N, w_gate, w_up, w_down)

    def run():
        for t in leaves:
            t.grad = None
        if blocks is None:
            y = sorted_moe_ffn(x, weights_N, token_N, counts, w_gate, w_up, w_down, "swiglu")
        else:
            y = blocked_moe_ffn(x, weights_N, token_N, counts, w_gate, w_up, w_down, "swiglu",
                                block_rows=None if blocks == "none" else int(blocks))
        y.backward(grad_y)
        return [y.detach()] + [t.grad.clone() for t in leaves]

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    p.add_argument("--blocks", nargs="+", default=["none", "512"], help="'none' (one block per segment) or N rows")
    p.add_argument("--uneven", type=float, default=0.0, help="sd of a per-expert logit bias (0: even segments)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    for b in a.blocks:
        if b != "none" and not (b.isdigit() and int(b) > 0):
            p.error(f"--blocks takes 'none' or a positive number of rows, got {b!r}")
    tune_cpu_allocator()
    torch.set_num_threads(a.threads)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "threads": a.threads, "clock": a.clock, "repeats": a.repeats, "uneven": a.uneven,
              "load_before": os.getloadavg()[0], "environment": run_environment("cpu"), "shapes": {}}
    for name in a.shapes:
        args, grad_y = _inputs(*SHAPES[name], uneven=a.uneven)
        rows = torch.tensor(args[3], dtype=torch.float)
        load_cv = (rows.std() / rows.mean()).item()
        fns = {"sorted": _candidate(None, args, grad_y)}
        fns.update({f"blocked-{b}": _candidate(b, args, grad_y) for b in a.blocks})
        ref = fns["sorted"]()
        for cname, fn in fns.items():
            err = max(((u - v).abs().max() / v.abs().max()).item() for u, v in zip(fn(), ref))
            if err > 1e-4:
                raise AssertionError(f"{cname} disagrees with sorted on {name}: relative error {err:.2e}")
        times = alternate(fns, repeats=a.repeats, clock=a.clock)
        result["shapes"][name] = {"shape": dict(zip(("tokens", "dim", "experts", "hidden", "top_k"), SHAPES[name])),
                                  "load_cv": load_cv, "largest_segment": int(rows.max()),
                                  "seconds": times, "ratio_to_sorted": {c: t / times["sorted"]
                                                                       for c, t in times.items()}}
        cells = "  ".join(f"{c} {t * 1e3:7.1f} ms x{t / times['sorted']:.3f}" for c, t in times.items())
        print(f"{name:<10} load CV {load_cv:.2f}  {cells}", flush=True)
    result["load_after"] = os.getloadavg()[0]
    if a.out:
        write_json(Path(a.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
