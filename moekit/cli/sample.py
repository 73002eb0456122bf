"""``moekit sample RUN --prompt TEXT``: generate text from a run's checkpoint (KV cache on by default)."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ..data import tokenizer_for
from ..serving import generate
from ..serving.decoding import rewiring_generate, scmoe_generate
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
    p.add_argument("--matmul", choices=("dequantize", "int8"), default=None,
                   help="compressed runs: int8 multiplies RTN/GPTQ/EAQuant experts with torch._int_mm on int8 "
                        "activations (CPU); default: dequantise each expert as it runs")
    add_threads_argument(p, f"1 for models under {SMALL_MODEL_PARAMS // 10**6}M parameters, whose one-token "
                         "matmuls lose more to thread synchronisation than they gain; torch's otherwise")
    p.add_argument("--decoding", default="sample", choices=("sample", "scmoe", "rewire"),
                   help="scmoe: self-contrast of strong vs weak (rank) routing, greedy; rewire: router offsets "
                        "fitted to the text so far (moekit.serving.decoding)")
    p.add_argument("--scmoe-alpha", type=float, default=0.1, help="SCMoE plausibility cutoff")
    p.add_argument("--scmoe-beta", type=float, default=0.5, help="SCMoE contrast strength (0 is greedy)")
    p.add_argument("--scmoe-weak-rank", type=int, nargs="+", default=[2], help="SCMoE weak routing's expert ranks")
    p.add_argument("--rewire-steps", type=int, default=5, help="Adam steps per re-adaptation of the offsets")
    p.add_argument("--rewire-lr", type=float, default=0.05, help="learning rate of the router offsets")
    p.add_argument("--rewire-every", type=int, default=16, help="generated tokens between re-adaptations")
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
    cfg, model, _ = load_run(args.run, args.device, args.matmul)
    apply_threads(decoding_threads(sum(p.numel() for p in model.parameters()), args.threads))
    tokenizer = tokenizer_for(cfg.data)
    ids = tokenizer.encode(args.prompt or "\n")
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give a non-empty --prompt")
    device = next(model.parameters()).device
    prompt = torch.tensor([ids], device=device)
    try:
        if args.decoding == "scmoe":
            out = scmoe_generate(model, prompt, args.max_new_tokens, weak_ranks=args.scmoe_weak_rank,
                                 alpha=args.scmoe_alpha, beta=args.scmoe_beta)
        elif args.decoding == "rewire":
            out = rewiring_generate(model, prompt, args.max_new_tokens, steps=args.rewire_steps, lr=args.rewire_lr,
                                    every=args.rewire_every, temperature=args.temperature, top_p=args.top_p,
                                    seed=args.seed)
        else:
            out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           use_cache=not args.no_cache, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    sys.stdout.write(tokenizer.decode(out[0].tolist()) + "\n")
    return 0
