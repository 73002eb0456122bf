"""MoTE: Mixture of Ternary Experts (arXiv 2506.14435; spec §6), upcycled from a dense model and trained with
quantisation-aware training through the trainer's :func:`~moekit.training.train_step`.

Dim legend: T tokens, D model dim, F hidden dim, E experts.

Each dense FFN becomes ``y = FFN_shared(x) + Σ_{i ∈ top-1} g_i(x) · E_i^tern(x)``: the pretrained FFN stays as a
frozen full-precision shared expert, and E routed experts, initialised from it (sparse upcycling), run with
ternary weights. Quantisation-aware training uses straight-through estimators: weights
``W̃ = clip(round(W / (mean|W| + ε)), −1, 1) · (mean|W| + ε)`` (BitNet b1.58's absmean, one scale per expert
matrix *(granularity not confirmed by the paper; our choice)*), activations int8 per token (absmax). The router
is top-1 with the P2 load-balancing loss; while upcycling only the routers and ternary experts train (attention,
norms, embeddings and the shared FFN are frozen).

The absmean scale is rounded to float16 in the forward pass (our choice), so every ternary weight
``{−s, 0, +s}`` is exactly representable in the ``ternary`` bank format (codes 0/1/2, per-row float16
``lo = −s``, ``hi = +s``). :func:`export_mote` turns a trained MoTE model into a plain moekit MoE model
(shared expert = the frozen FFN, top-1 router, experts in a ``ternary`` :class:`~.bank.CompressedBank` with
``act_bits = 8``), which :func:`compress_mote_run` saves as a compressed run folder (``moekit compress RUN
--method mote``) that ``moekit eval`` / ``sample`` / ``analyze`` open like any other and that gives the same
logits as the in-memory QAT model.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import ExpertBank, FeedForward
from ..experts.activations import hidden
from ..layers.moe import routing_stats
from ..models import ModelConfig
from ..routing import Router, RouterConfig
from ..types import RoutingContext

__all__ = ["MoTE", "act_quant_int8", "compress_mote_run", "export_mote", "mote_config", "mote_qat", "ternary_ste",
           "upcycle_to_mote"]

EPS = 1e-5


def ternary_scale(w: torch.Tensor) -> torch.Tensor:
    """The absmean scale ``mean|W| + ε``, rounded to float16 (so the bank stores it exactly)."""
    return (w.detach().abs().mean() + EPS).half().float()


def ternary_codes(w: torch.Tensor) -> torch.Tensor:
    """``clip(round(W / s), −1, 1)`` as float values in {−1, 0, 1}."""
    return torch.clamp(torch.round(w.detach() / ternary_scale(w)), -1, 1)


def ternary_ste(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternarisation with a straight-through (identity) backward."""
    q = (ternary_codes(w) * ternary_scale(w)).to(w.dtype)
    return w + (q - w).detach()


def act_quant_int8(x_TD: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantisation with a straight-through backward (:func:`.actquant.act_fake_quant`
    with 8 bits, which the exported bank runs)."""
    from .actquant import act_fake_quant
    return x_TD + (act_fake_quant(x_TD.detach(), 8) - x_TD).detach()


class MoTE(nn.Module):
    """A frozen full-precision shared FFN plus top-1 routed ternary experts; ``forward(x, ctx=None)``."""

    def __init__(self, shared: FeedForward, num_experts: int, *, router: RouterConfig | None = None,
                 name: str = "mote") -> None:
        super().__init__()
        self.name = name
        self.shared = shared
        for p in self.shared.parameters():
            p.requires_grad_(False)
        D, F_ = shared.dim, shared.hidden_dim
        self.router = Router(D, num_experts, 1, router or RouterConfig(aux_loss_coef=0.01))
        self.experts = ExpertBank(num_experts, D, F_, shared.activation)
        with torch.no_grad():  # sparse upcycling: every expert starts as the dense FFN
            for m in ("w_gate", "w_up", "w_down"):
                p = getattr(self.experts, m)
                if p is not None:
                    p.copy_(getattr(shared, m).detach().expand_as(p))

    def ternary_weights(self, e: int) -> dict[str, torch.Tensor]:
        return {m: ternary_ste(getattr(self.experts, m)[e]) for m in ("w_gate", "w_up", "w_down")
                if getattr(self.experts, m) is not None}

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, ctx, layer=self.name, num_sequences=x.shape[0] if x.dim() == 3 else 1)
        y_TD = self.shared(x_TD)
        xq_TD = act_quant_int8(x_TD)
        ids_T, g_T = routing.expert_ids_TK[:, 0], routing.weights_TK[:, 0].to(x.dtype)
        for e in range(self.experts.num_experts):
            rows = (ids_T == e).nonzero().flatten()
            if rows.numel() == 0:
                continue
            w = self.ternary_weights(e)
            xe = xq_TD[rows]
            h_gate = F.linear(xe, w["w_gate"]) if "w_gate" in w else None
            out = F.linear(act_quant_int8(hidden(self.experts.activation, h_gate, F.linear(xe, w["w_up"]))),
                           w["w_down"])
            y_TD = y_TD.index_add(0, rows, g_T[rows, None] * out)
        if ctx is not None and ctx.collect_stats:
            ctx.add_stats(self.name, routing_stats(routing))
        return y_TD.view(x.shape)


def upcycle_to_mote(model: nn.Module, num_experts: int, *, router: RouterConfig | None = None) -> nn.Module:
    """Replace every dense :class:`FeedForward` block FFN of a LanguageModel by a :class:`MoTE` (in place) and
    freeze everything but the routers and ternary experts."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for block in getattr(model, "layers", []):
        if isinstance(block.ffn, FeedForward):
            block.ffn = MoTE(copy.deepcopy(block.ffn), num_experts, router=router, name=f"layers.{block.index}.ffn")
            found += 1
    if not found:
        from .calibrate import CompressionError
        raise CompressionError("MoTE upcycles dense FFN layers and this model has none; train a dense run "
                               "(moekit train --preset dense) first")
    return model


def mote_qat(run_dir, num_experts: int = 4, *, steps: int = 50, lr: float = 1e-3) -> tuple[nn.Module, list[dict]]:
    """Upcycle a dense run to MoTE and train it with QAT for ``steps`` trainer steps; ``(model, metrics)``."""
    from ..data import load_data
    from ..training import load_run, train_step
    from .calibrate import CompressionError
    if steps < 1:
        raise CompressionError(f"--steps={steps}: MoTE's quantisation-aware training needs at least 1 step "
                               f"(e.g. --steps 100)")
    if num_experts < 1:
        raise CompressionError(f"MoTE num_experts={num_experts} must be at least 1 (the paper adds 4)")
    cfg, model, _ = load_run(run_dir, "cpu")
    if cfg.model.moe is not None or cfg.model.ffn != "moe":
        raise CompressionError(f"{run_dir} is not a dense run (model.moe is set or model.ffn={cfg.model.ffn!r}); "
                               f"MoTE upcycles the dense FFNs of a run of --preset dense")
    upcycle_to_mote(model, num_experts)
    model.train()
    data = load_data(cfg.data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = [train_step(model, opt, data, cfg, step, torch.device("cpu")) for step in range(steps)]
    return model.eval(), history


def mote_config(model_cfg: ModelConfig, num_experts: int, hidden_dim: int, router: RouterConfig) -> ModelConfig:
    """The :class:`~moekit.models.ModelConfig` of the exported model: every layer an MoE of ``num_experts`` top-1
    experts plus one shared expert of the dense FFN's size (the frozen FFN), reference engine."""
    from ..layers import MoEConfig
    moe = MoEConfig(dim=model_cfg.dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=1,
                    activation="swiglu", num_shared_experts=1, shared_hidden_dim=hidden_dim, engine="reference",
                    router=router)
    return model_cfg.replace(moe=moe, ffn="moe", dense_hidden_dim=hidden_dim)


@torch.no_grad()
def export_mote(model: nn.Module, model_cfg: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """``(LanguageModel, its ModelConfig)``: the trained MoTE ``model`` as a moekit MoE model whose routed experts
    are a ``ternary`` bank with int8 activations. Its logits equal the MoTE model's (same arithmetic)."""
    from ..layers import MoE
    from ..models import LanguageModel
    from .bank import CompressedBank
    from .calibrate import CompressionError, find_moe_layers
    from .quant import RowGrid
    from .surgery import install_bank
    motes = {m.name: m for m in model.modules() if isinstance(m, MoTE)}
    if not motes:
        raise CompressionError("export_mote needs a model upcycled by upcycle_to_mote (no MoTE layer found)")
    first = next(iter(motes.values()))
    cfg = mote_config(model_cfg, first.experts.num_experts, first.shared.hidden_dim, first.router.config)
    out = LanguageModel(cfg)
    own = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{n}.") for n in motes)}
    missing, unexpected = out.load_state_dict(own, strict=False)
    if unexpected or any(not k.split(".")[2] == "ffn" for k in missing):
        raise CompressionError(f"the MoTE model does not match its exported config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    for name, moe in find_moe_layers(out):
        mote = motes[name]
        assert isinstance(moe, MoE) and moe.shared_experts is not None
        moe.shared_experts.load_state_dict(mote.shared.state_dict())
        moe.router.load_state_dict(mote.router.state_dict())
        codes: dict[str, list] = {}
        for m in ("w_gate", "w_up", "w_down"):
            p = getattr(mote.experts, m)
            if p is None:
                continue
            codes[m] = []
            for e in range(p.shape[0]):
                s = ternary_scale(p[e])
                rows = p.shape[1]
                grid = RowGrid("ternary", 2, lo_R=-s.expand(rows).clone(), hi_R=s.expand(rows).clone())
                codes[m].append(((ternary_codes(p[e]) + 1).long(), grid))
        bank = CompressedBank.from_quantized(codes, torch.arange(mote.experts.num_experts),
                                             activation=mote.experts.activation)
        bank.spec = dataclasses.replace(bank.spec, act_bits=8)
        install_bank(moe, bank)
    return out.eval(), cfg


def compress_mote_run(run_dir, out_dir, *, steps: int = 50, num_experts: int = 4, lr: float = 1e-3):
    """``moekit compress RUN --method mote``: QAT from the dense run, export, save as a compressed run folder.

    Returns ``(CompressionReport, exported model)``; the report (also in the header) counts the routed ternary
    experts against their float32 size; the frozen shared FFN stays float32 and is reported separately.
    Nothing is written to ``out_dir`` unless training and export succeeded.
    """
    from ..training.runs import read_run_config
    from .api import CompressionReport, expert_bytes
    from .artifact import header_of, save_compressed_run
    from .calibrate import CompressionError, find_moe_layers
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressionError(f"--out {out} already exists and is not empty; choose a new folder")
    run_cfg = read_run_config(run_dir)
    model, history = mote_qat(run_dir, num_experts, steps=steps, lr=lr)
    exported, model_cfg = export_mote(model, run_cfg.model)
    params = sum(p.numel() for m in model.modules() if isinstance(m, MoTE) for p in m.experts.parameters())
    stored = expert_bytes(exported)
    layers = find_moe_layers(exported)
    shared = sum(p.numel() * p.element_size() for _, moe in layers if moe.shared_experts is not None
                 for p in moe.shared_experts.parameters())
    options = {"steps": steps, "num_experts": num_experts, "lr": lr}
    report = CompressionReport("mote", options, bytes_before=4 * params, bytes_after=stored, expert_params=params)
    for name, _ in layers:
        report.layers[name] = {"experts_before": 0, "experts_after": num_experts,
                                                      "format": "ternary", "act_bits": 8}
    extra = {"shared_ffn_bytes": shared, "final_train_loss": history[-1].get("loss") if history else None}
    header = header_of(exported, "mote", options, {**report.to_dict(), **extra})
    save_compressed_run(out_dir, dataclasses.replace(run_cfg, model=model_cfg), exported, header,
                        {"step": steps, "compressed_from": str(Path(run_dir).resolve())})
    return report, exported
