"""Cost claims of the MoE variants, measured: prints a table and writes JSON.

- MoE++ (arXiv 2410.07348): expert-forward throughput vs a vanilla MoE with the same FFN experts and top-k
  (zero-computation experts never reach a matmul, so the gain tracks the share of ZC assignments).
- Top-p routing (arXiv 2403.07652): experts per token and time vs top-2 (depends on how peaked the router is;
  we report an untrained router and routers sharpened by a logit temperature).
- Mixture-of-Depths (Raposo et al. 2024): block time and FLOPs with capacity c vs every token.

Usage: ``python benchmarks/bench_variants.py [--tokens 2048 --dim 128 --repeats 5 --out bench_variants.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from moekit import MoE, MoEConfig, RouterConfig, RoutingContext
from moekit.bench.timing import run_environment
from moekit.layers.variants.moepp import MoEPlusPlus, MoEPPConfig
from moekit.layers.variants.topp import TopPConfig, TopPMoE


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(layer, x):
    def run():
        layer.zero_grad(set_to_none=True)
        layer(x, RoutingContext()).square().mean().backward()
    return run


def flops(layer, x) -> int:
    with FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


def vanilla(args):
    """``(cfg, x, base, t_base)``: the vanilla MoE a variant is compared with (16 experts, top-2, sorted engine,
    no auxiliary loss), its input ``[tokens, dim]`` and its median forward + backward time."""
    cfg = MoEConfig(dim=args.dim, hidden_dim=2 * args.dim, num_experts=16, top_k=2, engine="sorted",
                    router=RouterConfig(aux_loss_coef=0.0))
    x = torch.randn(args.tokens, args.dim)
    torch.manual_seed(0)
    base = MoE(cfg)
    return cfg, x, base, timed(fwd_bwd(base, x), args.repeats)


def row(variant: str, setting: str, base, layer, x, t_base: float, t: float) -> dict:
    return dict(variant=variant, setting=setting, baseline_s=t_base, variant_s=t, speedup=t_base / t,
                flop_ratio=flops(base, x) / flops(layer, x))


def bench_moepp(args, rows):
    cfg, x, base, t_base = vanilla(args)
    for bias in (0.0, 1.0):  # bias > 0 raises the ZC logits, mimicking a router trained with small tau
        layer = MoEPlusPlus(cfg, MoEPPConfig(capacity_factor=None))
        with torch.no_grad():
            layer.gate.weight[16:] += bias * x.mean(0) / x.mean(0).square().sum()
        ctx = RoutingContext(collect_stats=True)
        layer(x, ctx)
        share = ctx.stats_summary()["moepp"]["zc_share"]
        t = timed(fwd_bwd(layer, x), args.repeats)
        rows.append(row("moepp", f"16 FFN + 4 ZC, top-2, zc_share={share:.2f}", base, layer, x, t_base, t))


def bench_topp(args, rows):
    cfg, x, base, t_base = vanilla(args)
    for sharpen in (1.0, 8.0, 16.0):
        layer = TopPMoE(cfg, TopPConfig(threshold=0.4))
        layer.moe.load_state_dict(base.state_dict())
        with torch.no_grad():
            layer.moe.router.weight *= sharpen
        ctx = RoutingContext(collect_stats=True)
        layer(x, ctx)
        k = ctx.stats_summary()["topp"]["experts_per_token"]
        t = timed(fwd_bwd(layer, x), args.repeats)
        rows.append(row("topp", f"P=0.4, router x{sharpen:g}, experts/token={k:.2f} vs 2", base, layer, x, t_base,
                        t))


def bench_mod(args, rows):
    try:
        from moekit.layers.variants.mod import MixtureOfDepths, MoDConfig
    except ImportError:
        return
    from moekit import FeedForward
    torch.manual_seed(0)
    block = FeedForward(args.dim, 4 * args.dim)
    x = torch.randn(max(1, args.tokens // 256), 256, args.dim)
    full = lambda h, ctx=None: block(h)  # noqa: E731  (a stand-in block: the FFN delta of a transformer block)
    t_full = timed(lambda: block(x).square().mean().backward(), args.repeats)
    for cap in (0.5, 0.125):
        mod = MixtureOfDepths(args.dim, MoDConfig(capacity=cap), name="mod")
        def run(mod=mod):
            mod.zero_grad(set_to_none=True)
            block.zero_grad(set_to_none=True)
            mod(x, full, RoutingContext()).square().mean().backward()
        t = timed(run, args.repeats)
        with FlopCounterMode(display=False) as c_full:
            block(x)
        with FlopCounterMode(display=False) as c_mod:
            mod(x, full)
        rows.append(dict(variant="mod", setting=f"capacity={cap}", baseline_s=t_full, variant_s=t,
                         speedup=t_full / t, flop_ratio=c_full.get_total_flops() / c_mod.get_total_flops()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="bench_variants.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    bench_moepp(args, rows)
    bench_topp(args, rows)
    bench_mod(args, rows)
    print(f"{'variant':8} {'setting':52} {'base ms':>9} {'variant ms':>11} {'speedup':>8} {'FLOP ratio':>11}")
    for r in rows:
        print(f"{r['variant']:8} {r['setting']:52} {1e3 * r['baseline_s']:9.2f} {1e3 * r['variant_s']:11.2f} "
              f"{r['speedup']:8.2f} {r['flop_ratio']:11.2f}")
    with open(args.out, "w") as f:
        json.dump(dict(args=vars(args), environment=run_environment("cpu"), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
