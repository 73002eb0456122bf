"""``moekit serve-sim RUN``: replay expert accesses under every cache policy × prefetcher × budget.

Examples::

    moekit serve-sim runs/default --prompt "def " -n 64 --save-trace trace.json   # record, then simulate
    moekit serve-sim runs/default --trace trace.json --budgets 50%,25% --policies lru,belady
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import get_tokenizer
from ..serving import parse_budget
from ..serving.cache import POLICIES
from ..serving.offload import open_store
from ..serving.simulate import SIM_PREFETCHERS, sweep
from ..serving.trace import load_trace, record_trace, save_trace
from ..training.checkpoint import write_json
from ..training.runs import read_run_config

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("serve-sim", help="simulate expert caching and prefetch on a recorded trace")
    p.add_argument("run", metavar="RUN", help="a run folder written by moekit train")
    p.add_argument("--trace", metavar="FILE", help="a trace to replay (default: record one from --prompt)")
    p.add_argument("--prompt", action="append", help="prompt(s) to record a trace from (repeatable)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens generated per prompt when recording")
    p.add_argument("--save-trace", metavar="FILE", help="write the recorded trace here")
    p.add_argument("--budgets", default="100%,50%,25%,12.5%", help="expert budgets: shares or bytes, comma-separated")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    p.add_argument("--prefetchers", default=",".join(SIM_PREFETCHERS),
                   help=f"comma-separated, of {', '.join(SIM_PREFETCHERS)}")
    p.add_argument("--bandwidth", type=float, default=25e9, help="bytes/s of expert copies (default: PCIe 4 x16)")
    p.add_argument("--compute-ms", type=float, default=0.1, help="compute time of one layer, milliseconds")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=run)


def _choices(text: str, allowed: tuple, flag: str) -> list[str]:
    from .main import UsageError
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UsageError(f"{flag}={text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return items


def run(args: argparse.Namespace) -> int:
    from .main import UsageError
    policies = _choices(args.policies, POLICIES, "--policies")
    prefetchers = _choices(args.prefetchers, SIM_PREFETCHERS, "--prefetchers")
    if args.bandwidth <= 0 or args.compute_ms < 0 or args.max_new_tokens < 1:
        raise UsageError("need --bandwidth > 0, --compute-ms >= 0 and --max-new-tokens >= 1")
    cfg = read_run_config(args.run)
    try:
        if args.trace:
            trace = load_trace(args.trace)
        else:
            tokenizer = get_tokenizer(cfg.data.tokenizer)
            prompts = [tokenizer.encode(p) for p in (args.prompt or ["def "])]
            if not all(prompts):
                raise UsageError("a --prompt encodes to no tokens; give non-empty prompts")
            trace = record_trace(args.run, prompts, args.max_new_tokens)
            if args.save_trace:
                save_trace(args.save_trace, trace)
        store = open_store(args.run)
        trace.check_model([store.num_experts(i) for i in range(len(store.layer_names))], store.expert_bytes,
                          args.trace or "the trace")
        budgets = [parse_budget(b.strip(), store.total_bytes, max(store.expert_bytes))
                   for b in args.budgets.split(",") if b.strip()]
        results = sweep(trace, budgets, policies, prefetchers, bandwidth=args.bandwidth,
                        compute_seconds=args.compute_ms / 1000)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
    best = {b: max(r.hit_rate for r in results if r.capacity_bytes == b and r.policy == "belady")
            for b in budgets} if "belady" in policies else {}
    print(f"{len(trace.steps)} passes x {trace.num_layers} layers, {len(trace.accesses())} expert accesses; "
          f"all experts {store.total_bytes:,} bytes")
    print(f"{'budget':>12} {'policy':>10} {'prefetch':>9} {'hit rate':>8} {'vs belady':>9} {'MB moved':>9} "
          f"{'stall ms':>9} {'recall':>6}")
    for r in results:
        gap = f"{100 * (r.hit_rate - best[r.capacity_bytes]):+8.1f}" if best else "       -"
        share = 100 * r.capacity_bytes / store.total_bytes
        print(f"{share:11.1f}% {r.policy:>10} {r.prefetcher:>9} {r.hit_rate:8.3f} {gap:>9} "
              f"{r.bytes_moved / 1e6:9.3f} {1000 * r.stall_seconds:9.3f} {r.prefetch_recall:6.2f}")
    if args.json:
        write_json(Path(args.json), [r.as_dict() for r in results])
    return 0
