"""``moekit info``: parameters, active parameters per token and FLOPs per token of a preset or config."""

from __future__ import annotations

import argparse

from ..models import count
from .common import add_config_arguments, config_from_args

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter and FLOP counts of a preset / config",
                              description="Parameters, active parameters per token and training FLOPs per token "
                              "of a preset or config.\n\nExamples:\n  moekit info --preset default\n"
                              "  moekit info --preset default --model.moe.num_experts=16")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    m = cfg.model
    c = count(m)
    layout = "".join("S" if m.is_sparse(i) else "D" for i in range(m.num_layers))
    ffn = (f"{m.ffn}: {m.moe.num_experts} experts x hidden {m.moe.hidden_dim}, top-{m.moe.top_k}"
           + (f", {m.moe.num_shared_experts} shared" if m.moe.num_shared_experts else "")
           if m.moe is not None else "none")
    rows = [("preset", f"{cfg.name}: {cfg.description}"),
            ("model", f"{m.num_layers} layers (S sparse, D dense: {layout}), dim {m.dim}, {m.num_heads} heads, "
                      f"context {m.context}, vocab {m.vocab_size}"),
            ("sparse FFN", ffn), ("dense FFN hidden", str(m.resolved_dense_hidden_dim)),
            ("parameters", f"{c.total_params:,}"), ("active parameters / token", f"{c.active_params:,}"),
            ("embedding parameters", f"{c.embedding_params:,}"),
            ("training FLOPs / token", f"{c.flops_per_token:,} (6 x {c.matmul_params:,} matmul params + "
                                       f"12 x layers x dim x context)"),
            ("tokens / step", f"{cfg.train.batch_size * cfg.train.grad_accum * m.context:,}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0
