"""The MoE layer benchmark of BENCHMARKS.md.

``sorted`` (and every other applicable moekit engine) against, in the same run:
- dense-equivalent: a SwiGLU FFN with ``hidden_dim = (top_k + shared) * hidden_dim`` (same active FLOPs);
- transformers: ``MixtralSparseMoeBlock`` with the same weights, ``eager`` and ``grouped_mm`` experts
  implementations (plus the same shared FFN where the shape has one), when transformers is installed.

Forward and forward+backward times and memory, each as a ratio to dense-equivalent. Outputs are checked
to agree before anything is timed.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch
from torch import nn

from ..experts import FeedForward
from ..layers import MoE, MoEConfig
from ..routing import RouterConfig
from .timing import alternate_rounds, paired_ratios, peak_memory, run_environment, saved_activation_bytes

__all__ = ["SHAPES", "bench_layer", "format_table"]


@dataclasses.dataclass(frozen=True)
class Shape:
    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    shared: int
    tokens: int
    gpu_only: bool = False


SHAPES = {
    "mixtral-s": Shape(512, 1024, 8, 2, 0, 4096),
    "fine-s": Shape(512, 256, 64, 8, 1, 4096),
    "mixtral-m": Shape(4096, 14336, 8, 2, 0, 16384, gpu_only=True),
    "qwen3-30b-a3b": Shape(2048, 768, 128, 8, 0, 16384, gpu_only=True),
}


def _transformers_block(moe: MoE, implementation: str) -> nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    c = moe.config
    cfg = MixtralConfig(hidden_size=c.dim, intermediate_size=c.hidden_dim, num_local_experts=c.num_experts,
                        num_experts_per_tok=c.top_k, router_jitter_noise=0.0)
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    assert moe.experts.w_gate is not None  # a gated (SwiGLU) bank, as Mixtral's
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.experts.w_gate, moe.experts.w_up], dim=1))
        block.experts.down_proj.copy_(moe.experts.w_down)
    shared = moe.shared_experts

    class WithShared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.shared = block, shared

        def forward(self, x):
            y = self.block(x)
            return y if self.shared is None else y + self.shared(x)

    return WithShared()


def _check_agreement(candidates: dict[str, nn.Module], x: torch.Tensor, name: str) -> None:
    """Every MoE candidate must compute the same function (checked in float32, where the routing of
    different implementations agrees; in bfloat16 near-ties may pick different experts)."""
    moe_names = [n for n in candidates if n != "dense-equivalent"]
    with torch.no_grad():
        if x.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        ref = candidates[moe_names[0]](x)
        for cname in moe_names[1:]:
            if cname.startswith("moekit-grouped_mm"):
                continue  # bfloat16-only on CUDA; tested against the reference in tests/test_gpu.py
            err = (candidates[cname](x) - ref).abs().max().item() / ref.abs().max().item()
            if err > 1e-4:
                raise AssertionError(f"{cname} disagrees with {moe_names[0]} on {name}: relative error {err:.2e}")


def bench_layer(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 10,
                engines: tuple[str, ...] = ("sorted",), tokens: int | None = None,
                tick: Callable[[], None] | None = None, clock: str = "wall") -> dict:
    """Benchmark one shape; returns absolute medians and ratios to dense-equivalent, timed on ``clock``
    (``wall`` or ``cpu``: :mod:`moekit.bench.timing`).

    ``tick()`` is called after every timing round: ``2 * (repeats + 2)`` times (forward, then forward+backward).
    """
    s = SHAPES[name]
    T = tokens or s.tokens
    torch.manual_seed(0)
    cfg = MoEConfig(dim=s.dim, hidden_dim=s.hidden_dim, num_experts=s.num_experts, top_k=s.top_k,
                    num_shared_experts=s.shared, router=RouterConfig(aux_loss_coef=0.0))
    moe = MoE(cfg).to(device)
    dense = FeedForward(s.dim, cfg.active_hidden).to(device)
    x = torch.randn(1, T, s.dim, device=device, dtype=dtype)
    g = torch.randn_like(x)

    candidates: dict[str, nn.Module] = {"dense-equivalent": dense}
    for engine in engines:
        layer = MoE(dataclasses.replace(cfg, engine=engine)).to(device)
        layer.load_state_dict(moe.state_dict())
        candidates[f"moekit-{engine}"] = layer
    for impl in ("eager", "grouped_mm"):
        block = _transformers_block(moe, impl)
        if block is not None:
            candidates[f"transformers-{impl}"] = block.to(device)
    _check_agreement(candidates, x[:, :512].float(), name)
    for module in candidates.values():
        module.to(dtype)

    def fwd(module):
        def run():
            with torch.no_grad():
                return module(x)
        return run

    def fwd_bwd(module):
        xg = x.detach().requires_grad_(True)

        def run():
            module.zero_grad(set_to_none=True)
            (module(xg) * g).sum().backward()
        return run

    env_before = run_environment(device)
    forward_rounds = alternate_rounds({n: fwd(m) for n, m in candidates.items()}, repeats=repeats, device=device,
                                      tick=tick, clock=clock)
    train_rounds = alternate_rounds({n: fwd_bwd(m) for n, m in candidates.items()}, repeats=repeats,
                                    device=device, tick=tick, clock=clock)
    forward = {n: statistics.median(ts) for n, ts in forward_rounds.items()}
    train = {n: statistics.median(ts) for n, ts in train_rounds.items()}
    env_after = run_environment(device)
    memory = {}
    for n, m in candidates.items():
        xg = x.detach().requires_grad_(True)
        peak = peak_memory(fwd_bwd(m), device)

        def forward_once(m: nn.Module = m, xg: torch.Tensor = xg) -> torch.Tensor:
            return m(xg)

        memory[n] = peak if peak is not None else saved_activation_bytes(forward_once, m)
    base = "dense-equivalent"
    forward_spread, train_spread = paired_ratios(forward_rounds, base), paired_ratios(train_rounds, base)
    rows = {n: {"forward_s": forward[n], "train_s": train[n], "memory_bytes": memory[n],
                "forward_ratio": forward[n] / forward[base], "train_ratio": train[n] / train[base],
                "forward_ratio_quartiles": list(forward_spread[n]), "train_ratio_quartiles": list(train_spread[n]),
                "memory_ratio": memory[n] / memory[base]} for n in candidates}
    return {"shape": name, **dataclasses.asdict(s), "tokens": T, "device": device, "dtype": str(dtype),
            "threads": torch.get_num_threads(), "repeats": repeats, "clock": clock,
            "environment": {**env_before, "load_average_after": env_after["load_average"]},
            "memory_kind": "cuda peak" if device.startswith("cuda") else "saved activations", "results": rows}


def format_table(result: dict) -> str:
    lines = [f"## {result['shape']}  (T={result['tokens']}, {result['device']}, {result['dtype']}, "
             f"threads={result['threads']}, clock={result.get('clock', 'wall')}; memory = {result['memory_kind']})",
             f"{'candidate':<24}{'fwd ms':>10}{'fwd x':>8}{'fwd+bwd ms':>12}{'fwd+bwd x':>11}"
             f"{'per-round x q1-q3':>19}{'mem x':>8}"]
    for n, r in result["results"].items():
        q = r["train_ratio_quartiles"]
        spread = f"{q[0]:.2f}-{q[2]:.2f}"
        lines.append(f"{n:<24}{r['forward_s'] * 1e3:>10.1f}{r['forward_ratio']:>8.2f}"
                     f"{r['train_s'] * 1e3:>12.1f}{r['train_ratio']:>11.2f}{spread:>19}{r['memory_ratio']:>8.2f}")
    lines.append("(fwd+bwd x: ratio of medians; q1-q3: quartiles of the ratio to dense-equivalent taken round by "
                 "round; a difference inside that range is noise)")
    return "\n".join(lines)
