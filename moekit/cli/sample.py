"""``moekit sample RUN --prompt TEXT``: generate text from a run's checkpoint (KV cache on by default)."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ..data import get_tokenizer
from ..serving import generate
from ..training import load_run
from .common import add_threads_argument, apply_threads

__all__ = ["SMALL_MODEL_PARAMS", "decoding_threads", "register"]

SMALL_MODEL_PARAMS = 100_000_000


def decoding_threads(num_params: int, requested: int | None) -> int | None:
    """Threads for token-by-token decoding: ``requested``, else 1 for a small model, else ``None`` (torch's)."""
    if requested is not None:
        return requested
    return 1 if num_params < SMALL_MODEL_PARAMS else None


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate text from a run's checkpoint",
                              description="Generate text from a run's checkpoint (KV cache on by default).\n\n"
                              "Examples:\n  moekit sample runs/default --prompt 'def ' -n 64\n"
                              "  moekit sample runs/default --prompt 'import ' --temperature 0   # greedy")
    p.add_argument("run", metavar="RUN", help="a run folder written by moekit train")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (1 disables)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window each token")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    add_threads_argument(p, f"1 for models under {SMALL_MODEL_PARAMS // 10**6}M parameters, whose one-token "
                         "matmuls lose more to thread synchronisation than they gain; torch's otherwise")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .main import UsageError
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or not 0 < args.top_p <= 1 \
            or args.max_new_tokens < 0:
        raise UsageError(f"need a finite --temperature >= 0 (got {args.temperature}), 0 < --top-p <= 1 (got "
                         f"{args.top_p}) and --max-new-tokens >= 0 (got {args.max_new_tokens})")
    try:
        (args.prompt or "").encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("--prompt is not valid UTF-8 text; check the terminal's or script's encoding") from None
    cfg, model, _ = load_run(args.run, args.device)
    apply_threads(decoding_threads(sum(p.numel() for p in model.parameters()), args.threads))
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    ids = tokenizer.encode(args.prompt or "\n")
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give a non-empty --prompt")
    device = next(model.parameters()).device
    out = generate(model, torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, use_cache=not args.no_cache, seed=args.seed)
    sys.stdout.write(tokenizer.decode(out[0].tolist()) + "\n")
    return 0
