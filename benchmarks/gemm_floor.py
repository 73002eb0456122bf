"""The matmul floor of an MoE layer on this CPU: per-expert products vs the dense-equivalent's products (issue 20).

    PYTHONPATH=. python benchmarks/gemm_floor.py [--shapes fine-s mixtral-s] [--repeats 8] [--threads 1]
        [--out docs/bench/gemm_floor_cpu.json]

Dim legend: E experts, n rows per expert (balanced: ``tokens * top_k / E``), D model dim, F expert hidden dim,
H dense-equivalent hidden dim (``top_k * F``, shared experts excluded: they are dense products in both).

For each shape, the six matrix products of an expert FFN's forward and backward (gate+up, down; the down and
gate/up input gradients; the three weight gradients) run as the ``sorted`` engine runs them (one ``torch.mm``
per expert on contiguous row segments, written in place) and as the dense-equivalent runs them (one product
over all tokens with hidden size H). Both do the same FLOPs. Timed alternately (medians) on the CPU clock
(``moekit.bench.timing``), so the ratio is the matmul library's efficiency on many small products relative to
few large ones: the part of the MoE layer's time that no change to dispatch, gathers or elementwise work can
remove. Also times one batched product (``torch.bmm`` on an ``[E, n, D]`` layout with equal segments) and
gate+up fused into one product per expert.
"""

from __future__ import annotations

import argparse
import sys

import torch

from moekit.bench.layer import SHAPES
from moekit.bench.timing import alternate, run_environment
from moekit.runtime import tune_cpu_allocator


def floor(name: str, repeats: int) -> dict:
    s = SHAPES[name]
    E, D, F, K, T = s.num_experts, s.dim, s.hidden_dim, s.top_k, s.tokens
    n = T * K // E
    N, H = n * E, K * F
    torch.manual_seed(0)
    x_ND, h_NF, g_ND = torch.randn(N, D), torch.randn(N, F), torch.randn(N, D)
    w_EFD, w_EDF, w_E2FD = torch.randn(E, F, D), torch.randn(E, D, F), torch.randn(E, 2 * F, D)
    out_NF, out_ND, out_N2F = torch.empty(N, F), torch.empty(N, D), torch.empty(N, 2 * F)
    gw_EFD, gw_EDF = torch.empty(E, F, D), torch.empty(E, D, F)
    x_TD, h_TH, g_TD = torch.randn(T, D), torch.randn(T, H), torch.randn(T, D)
    w_HD, w_DH = torch.randn(H, D), torch.randn(D, H)

    def seg(e: int) -> slice:
        return slice(e * n, (e + 1) * n)

    def experts() -> None:  # forward: gate, up, down; backward: down input grad, down weight grad, 2 x (input
        for e in range(E):  # grad, weight grad) of gate/up: 9 products per expert, as the sorted engine
            r = seg(e)
            torch.mm(x_ND[r], w_EFD[e].t(), out=out_NF[r])
            torch.mm(x_ND[r], w_EFD[e].t(), out=out_NF[r])
            torch.mm(h_NF[r], w_EDF[e].t(), out=out_ND[r])
            torch.mm(g_ND[r], w_EDF[e], out=out_NF[r])
            torch.mm(g_ND[r].t(), h_NF[r], out=gw_EDF[e])
            for _ in range(2):
                torch.mm(h_NF[r].t(), x_ND[r], out=gw_EFD[e])
            torch.mm(h_NF[r], w_EFD[e], out=out_ND[r])
            out_ND[r].addmm_(h_NF[r], w_EFD[e])

    def dense() -> None:
        for _ in range(2):
            torch.mm(x_TD, w_HD.t())
        torch.mm(h_TH, w_DH.t())
        torch.mm(g_TD, w_DH)
        torch.mm(g_TD.t(), h_TH)
        for _ in range(2):
            torch.mm(h_TH.t(), x_TD)
        torch.mm(h_TH, w_HD).addmm_(h_TH, w_HD)

    def gate_up_loop() -> None:
        for e in range(E):
            torch.mm(x_ND[seg(e)], w_EFD[e].t(), out=out_NF[seg(e)])
            torch.mm(x_ND[seg(e)], w_EFD[e].t(), out=out_NF[seg(e)])

    def gate_up_fused() -> None:
        for e in range(E):
            torch.mm(x_ND[seg(e)], w_E2FD[e].t(), out=out_N2F[seg(e)])

    def gate_up_bmm() -> None:
        torch.bmm(x_ND.view(E, n, D), w_E2FD.transpose(1, 2), out=out_N2F.view(E, n, 2 * F))

    def gate_up_dense() -> None:
        for _ in range(2):
            torch.mm(x_TD, w_HD.t())

    times = alternate({"experts": experts, "dense": dense, "gate_up_loop": gate_up_loop,
                       "gate_up_fused": gate_up_fused, "gate_up_bmm": gate_up_bmm, "gate_up_dense": gate_up_dense},
                      repeats=repeats, warmup=1, clock="cpu")
    flops = 9 * 2 * N * D * F
    return {"shape": name, "E": E, "n": n, "D": D, "F": F, "H": H, "repeats": repeats, "clock": "cpu",
            "environment": run_environment("cpu"), "seconds": times,
            "gflops": {"experts": flops / times["experts"] / 1e9, "dense": flops / times["dense"] / 1e9},
            "experts_over_dense": times["experts"] / times["dense"],
            "gate_up_over_dense": {k: times[f"gate_up_{k}"] / times["gate_up_dense"]
                                   for k in ("loop", "fused", "bmm")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["fine-s", "mixtral-s"])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or args.repeats < 1 or args.threads < 1:
        print(f"error: shapes must be among {list(SHAPES)} (got {unknown}), --repeats and --threads >= 1",
              file=sys.stderr)
        return 2
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.shapes:
        r = floor(name, args.repeats)
        results.append(r)
        g = r["gate_up_over_dense"]
        print(f"{name}: expert products {r['gflops']['experts']:.0f} GFLOP/s, dense {r['gflops']['dense']:.0f} "
              f"GFLOP/s -> x{r['experts_over_dense']:.3f} of the dense products' time; gate+up only: "
              f"loop x{g['loop']:.3f}, fused x{g['fused']:.3f}, bmm x{g['bmm']:.3f}")
    if args.out:
        from moekit.training.checkpoint import write_json
        write_json(args.out, {"environment": run_environment("cpu"), "results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
