"""``moekit serve RUN``: an OpenAI-compatible completions server (needs the ``serve`` extra).

Examples::

    moekit serve runs/default                                   # http://127.0.0.1:8000/v1/completions
    moekit serve runs/default --port 8080 --expert-memory 25% --policy lru --prefetch router
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import sys

from ..data import get_tokenizer
from ..serving.cache import POLICIES
from ..serving.offload import PREFETCHERS
from ..training import load_run

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a run's model over HTTP (OpenAI-compatible completions)")
    p.add_argument("run", metavar="RUN", help="a run folder written by moekit train")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--expert-memory", default=None,
                   help="offload experts: budget as a share ('25%%') or bytes ('64MiB'); default: all resident")
    p.add_argument("--policy", default="lru", choices=[c for c in POLICIES if c != "belady"],
                   help="expert cache policy when offloading")
    p.add_argument("--prefetch", default="none",
                   choices=[c for c in PREFETCHERS if c not in ("affinity", "m2r2")],
                   help="expert prefetcher when offloading")
    p.add_argument("--miss-levels", type=int, default=0,
                   help="bit-nested runs (moekit compress --method d2moe-mwq): residual planes loaded before a "
                        "missing expert runs (0: misses run at the low-bit base); experts are cached plane by plane, "
                        "hottest expert first (--policy does not apply)")
    p.add_argument("--async-prefetch", action="store_true",
                   help="copy prefetched experts on a background thread (a side stream on CUDA)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .main import UsageError
    try:
        import uvicorn

        from ..serving.server import build_app
    except ModuleNotFoundError as e:
        raise UsageError(f"moekit serve needs the 'serve' extra ({e.name} is missing): "
                         f"pip install 'moekit[serve]'") from None
    if not 0 <= args.port <= 65535 or args.max_batch < 1:
        raise UsageError(f"need 0 <= --port <= 65535 and --max-batch >= 1 (got {args.port}, {args.max_batch})")
    from ..compression.artifact import is_compressed_run
    try:
        if args.expert_memory is None:
            cfg, model, _ = load_run(args.run, args.device)
        elif is_compressed_run(args.run):
            from ..serving.nested_run import load_offloaded_nested
            cfg, model, _ = load_offloaded_nested(args.run, args.expert_memory, miss_levels=args.miss_levels,
                                                  prefetch=args.prefetch, record=False)
        else:
            from ..serving import load_offloaded
            cfg, model, _ = load_offloaded(args.run, args.expert_memory, args.policy, prefetch=args.prefetch,
                                           device=args.device, record=False, asynchronous=args.async_prefetch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    try:
        app = build_app(model, tokenizer.encode, tokenizer.decode, model_name=str(args.run),
                        max_batch=args.max_batch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"moekit serve: {args.run} on http://{args.host}:{args.port}/v1/completions", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
