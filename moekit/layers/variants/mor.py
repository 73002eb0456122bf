"""Mixture-of-Recursions (MoR; Bae et al. 2025, arXiv 2507.10524, github raymin0223/mixture_of_recursions):
expert-choice routing over recursion depth of one shared block.

Dim legend: B batch, S sequence, K_r tokens selected at step r, D model dim.

A wrapper around a shared block callable ``block(x_BKD, ctx) -> out_BKD`` (the block's *full output hidden state*,
its internal residuals included), applied ``N_r`` times. At step ``r``, on the tokens still active::

    g_t = alpha * sigmoid(theta_r^T H_t / temperature)
    K_r = max(1, floor(capacity_r * S))  best g among the tokens selected at step r-1 (hierarchical filtering;
                                          S is the full sequence length; exact floor), kept in causal order
    H_t <- H_t + g_t * Block(H_sel)_t   for selected t;  unselected tokens are unchanged

As the spec notes, the update adds the block's full output (``H + g Block(H)``), not a delta; reproduced as is.
Capacities default to ``N_r/N_r, (N_r-1)/N_r, ..., 1/N_r``. The selected positions of each step go to
``ctx.state["depth.positions"]`` (``POSITIONS_KEY``, shared with MoD; for the block's RoPE positions and
mask). The causal inference path is trained with
``mor_router_loss``: BCE between router logits and top-k membership over that step's candidates (averaged).
Statistics: ``fraction_processed`` (mean over steps of K_r / S) and ``mean_depth`` (recursions per token).

**Token-choice routing** (``routing="token_choice"``, the paper's alternative): one router at the start scores the
``N_r`` depths, ``p_t = softmax(W x_t / temperature)``; each token takes its top-1 depth ``d_t`` and runs steps
``1..d_t``; at every step it runs, ``H_t <- H_t + g_t * Block(H_sel)_t`` with ``g_t = alpha * N_r * p_t(d_t)``
*(reconstructed: the spec names the router and its balancing, not the gate; the factor N_r makes a uniform router
give the expert-choice gate's scale alpha/2..alpha)*. The active sets are nested (``d_t >= r``), each sequence
keeps its own number of active tokens (run sequence by sequence when they differ), and a Switch balancing loss
over the depth choices (``balance_coef``, loss ``mor_balance_loss``) keeps depths used. No causality fix is needed.

**Causal inference** (``eval_routing="threshold"``, the default in evaluation; expert choice): top-k over the
sequence lets a later token decide whether an earlier one recurses, so (spec: "use a per-token threshold on the
BCE-trained router output") in evaluation a candidate token runs step ``r`` iff ``sigmoid(logit_r) > threshold``
(0.5: the decision the BCE loss ``mor_router_loss`` trains towards top-k membership), with the same hierarchical
filtering (only tokens that ran step ``r-1`` are candidates) and the same gate ``alpha * sigmoid(logit_r)``. A step
of capacity 1 takes every candidate, as top-k does. Each sequence keeps its own active set, so the block runs
sequence by sequence when the counts differ (as in token choice). Whether token ``t`` recurses depends on its own
hidden state only, which depends on tokens ``<= t`` (the block is causal over the gathered, causally ordered
subsequence), so the whole forward is causal. It equals top-k routing whenever the router separates the top-k
tokens from the rest at the threshold (tested). ``eval_routing="expert_choice"`` keeps top-k in evaluation
(non-causal: for analysis, or a router trained without the BCE loss). Training always uses top-k.
``inference_router`` picks what the threshold reads, the spec's two causality fixes: ``main`` (default; the
spec's ``aux_loss``) trains the step's own router with the BCE loss ``mor_router_loss`` towards top-k membership;
``aux`` (the spec's ``aux_router``) adds one small linear router per step, fed the *detached* hidden states and
trained alone by ``mor_aux_router_loss`` (BCE towards the main router's top-k membership, coefficient
``aux_coef``, averaged over the step's candidates), so the main router gets no BCE loss; the gate is the main
router's either way. In training the statistic ``threshold_agreement`` is the fraction of (candidate, step)
decisions, over steps of capacity < 1, where the threshold rule reproduces top-k: how ready the causal path is.
Choices: the threshold is a config value (0.5); the auxiliary router's logit is not divided by ``temperature``.

**Capacity warm-up** (``cap_warmup_steps``, expert choice; the code's ``cap_warmup_step``): in training the
capacity of every step starts at 1.0 and decays by a half cosine to its target,
``c_r(s) = c_r + (1 - c_r) * (1 + cos(pi * min(s / W, 1))) / 2`` after ``s`` optimizer steps (``on_step``, which
the trainer calls after each step and on resume); evaluation always uses the target.

**Recursion-wise KV sharing** (``kv_sharing=True``): the keys and values of each shared block's attention are
computed at the first recursion and reused by every later one; at step ``r`` the active tokens' queries attend to
the step-1 keys at positions ``<=`` their own (a positional causal mask; the step-``r`` set is a subset of the
step-1 set, so no query is left without keys). The model's dense attention does this through
:func:`shared_kv_attention` and ``ctx.state[KV_SHARE_KEY]``; attention variants do not (an error). Without it,
each step attends only among its own active tokens (recursion-wise caching's semantics; moekit's MoR has no
sampling cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...configs import check, check_choice
from ...routing.losses import load_balancing_loss
from ...routing.selectors import token_count
from ...types import RoutingContext
from ._common import add_extra
from .mod import POSITIONS_KEY, Block, gather_BKD, select_tokens

__all__ = ["MoRConfig", "MixtureOfRecursions", "POSITIONS_KEY", "KV_SHARE_KEY", "shared_kv_attention"]

KV_SHARE_KEY = "mor.kv_share"  # {"reuse": bool, "rows": int | None, "kv": {layer: (k_BHKDh, v_BHKDh, pos_BK)}}


@dataclass(frozen=True, kw_only=True, slots=True)
class MoRConfig:
    """Attributes:
        num_recursions: N_r (paper: 2-4).
        routing: ``expert_choice`` (default: per-step routers, top-k over the sequence) or ``token_choice`` (one
            router assigns each token a depth).
        capacities: per-step fraction of the sequence; empty means ``(N_r - r) / N_r`` for r = 0..N_r-1.
        alpha: gate scale (0.1 assumed, from memory of the code's default; verify).
        temperature: router temperature.
        aux_coef: coefficient of the BCE router loss (expert choice); 0 disables.
        balance_coef: coefficient of the Switch balancing loss over depths (token choice); 0 disables.
        cap_warmup_steps: training steps of the cosine capacity warm-up from 1.0 (expert choice); 0: none.
        kv_sharing: later recursions reuse the first recursion's keys and values.
        eval_routing: expert choice in evaluation: ``threshold`` (causal, per token) or ``expert_choice`` (top-k
            over the sequence, not causal).
        threshold: a candidate runs a step in evaluation iff ``sigmoid(router logit) > threshold``.
        inference_router: what the threshold reads: ``main`` (each step's router, trained by the BCE loss) or
            ``aux`` (a separate per-step router on detached hidden states, trained by its own BCE loss).
    """

    num_recursions: int = 3
    routing: Literal["expert_choice", "token_choice"] = "expert_choice"
    capacities: tuple[float, ...] = ()
    alpha: float = 0.1
    temperature: float = 1.0
    aux_coef: float = 0.01
    balance_coef: float = 0.01
    cap_warmup_steps: int = 0
    kv_sharing: bool = False
    eval_routing: Literal["threshold", "expert_choice"] = "threshold"
    threshold: float = 0.5
    inference_router: Literal["main", "aux"] = "main"

    def __post_init__(self) -> None:
        check(self.num_recursions >= 1, f"variant.num_recursions={self.num_recursions} must be >= 1")
        check_choice("variant", "routing", self.routing, ("expert_choice", "token_choice"))
        check(not self.capacities or len(self.capacities) == self.num_recursions,
              f"variant.capacities has {len(self.capacities)} entries; give one per recursion "
              f"({self.num_recursions}) or none for the default schedule")
        check(all(0 < c <= 1 for c in self.capacities), f"variant.capacities={self.capacities} must be in (0, 1]")
        check(self.temperature > 0 and self.aux_coef >= 0 and self.balance_coef >= 0,
              "variant.temperature must be > 0, aux_coef and balance_coef >= 0")
        check(self.cap_warmup_steps >= 0, f"variant.cap_warmup_steps={self.cap_warmup_steps} must be >= 0 (0: none)")
        check(self.routing == "expert_choice" or (not self.capacities and self.cap_warmup_steps == 0),
              "variant.capacities and variant.cap_warmup_steps are for routing='expert_choice' (token choice sets "
              "each token's depth); remove them or use expert choice")

        check_choice("variant", "eval_routing", self.eval_routing, ("threshold", "expert_choice"))
        check(0 < self.threshold < 1, f"variant.threshold={self.threshold} must be in (0, 1) (the sigmoid of the "
              f"router logit is compared with it; 0.5 matches the BCE router loss)")
        check_choice("variant", "inference_router", self.inference_router, ("main", "aux"))
        check(self.inference_router == "main" or self.routing == "expert_choice",
              "variant.inference_router='aux' is for routing='expert_choice' (token choice is causal already); "
              "remove it or use expert choice")

    def schedule(self) -> tuple[float | Fraction, ...]:
        """Capacity of each recursion: ``capacities`` or the exact fractions ``(N_r - r) / N_r``."""
        n = self.num_recursions
        return self.capacities or tuple(Fraction(n - r, n) for r in range(n))

    def warmed(self, step: int) -> tuple[float | Fraction, ...]:
        """The training capacities after ``step`` optimizer steps of the cosine warm-up (targets once done)."""
        if self.cap_warmup_steps == 0 or step >= self.cap_warmup_steps:
            return self.schedule()
        w = (1 + math.cos(math.pi * step / self.cap_warmup_steps)) / 2
        # rounded to a fraction so that 5/6 of 6 tokens is 5, not the float's 4.999...
        return tuple(Fraction(float(c) + (1 - float(c)) * w).limit_denominator(10**6) for c in self.schedule())


def shared_kv_attention(ctx: Any, layer: int, q_BHKDh: torch.Tensor, k_BHKDh: torch.Tensor,
                        v_BHKDh: torch.Tensor) -> torch.Tensor | None:
    """Recursion-wise KV sharing for an attention module: ``None`` when MoR does not share KV in ``ctx`` (the
    caller attends as usual); else the attention output ``[B, H, K, Dh]`` over the first recursion's keys."""
    share = None if ctx is None else ctx.state.get(KV_SHARE_KEY)
    if share is None:
        return None
    B, _, K, _ = q_BHKDh.shape
    pos_BK = ctx.state.get(POSITIONS_KEY)
    if pos_BK is None:
        pos_BK = torch.arange(K, device=q_BHKDh.device).expand(B, K)
    if not share["reuse"]:
        share["kv"][layer] = (k_BHKDh, v_BHKDh, pos_BK)
        return None
    k1, v1, pos1_BP = share["kv"][layer]
    if share["rows"] is not None:  # token choice, one sequence at a time
        row = share["rows"]
        k1, v1, pos1_BP = k1[row:row + 1], v1[row:row + 1], pos1_BP[row:row + 1]
    mask_BKP = pos1_BP[:, None, :] <= pos_BK[:, :, None]
    return F.scaled_dot_product_attention(q_BHKDh, k1, v1, attn_mask=mask_BKP[:, None])


class MixtureOfRecursions(nn.Module):
    """``forward(x_BSD, block, ctx=None)``: the shared block applied up to ``N_r`` times per token."""

    def __init__(self, dim: int, config: MoRConfig | None = None, name: str = "mor") -> None:
        super().__init__()
        self.config, self.name = config or MoRConfig(), name
        n = self.config.num_recursions
        if self.config.routing == "token_choice":
            self.routers = nn.ModuleList([nn.Linear(dim, n, bias=False)])
        else:
            self.routers = nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in range(n))
        self.aux_routers = (nn.ModuleList(nn.Linear(dim, 1, bias=False) for _ in range(n))
                            if self.config.inference_router == "aux" else None)
        self.step = 0  # optimizer steps done (the capacity warm-up's clock), set by on_step

    def on_step(self, step: int) -> None:
        self.step = step

    def _router(self, r: int) -> nn.Linear:
        router = self.routers[r]
        assert isinstance(router, nn.Linear)
        return router

    def _decision_logit(self, r: int, h_BSD: torch.Tensor, logit_BS: torch.Tensor) -> torch.Tensor:
        """The logit the inference threshold reads at step ``r``: the main router's, or the auxiliary router's on
        the detached hidden states."""
        if self.aux_routers is None:
            return logit_BS
        aux = self.aux_routers[r]
        assert isinstance(aux, nn.Linear)
        return F.linear(h_BSD.detach().float(), aux.weight.float())[..., 0]

    def forward(self, x_BSD: torch.Tensor, block: Block, ctx: RoutingContext | None = None) -> torch.Tensor:
        share: dict[str, Any] | None = {"reuse": False, "rows": None, "kv": {}} if self.config.kv_sharing else None
        if ctx is not None:
            ctx.state[KV_SHARE_KEY] = share
        try:
            if self.config.routing == "token_choice":
                return self._token_choice(x_BSD, block, ctx, share)
            if not self.training and self.config.eval_routing == "threshold":
                return self._threshold(x_BSD, block, ctx, share)
            return self._expert_choice(x_BSD, block, ctx, share)
        finally:
            if ctx is not None:
                ctx.state[KV_SHARE_KEY] = None

    def _expert_choice(self, x_BSD: torch.Tensor, block: Block, ctx: RoutingContext | None,
                       share: dict | None) -> torch.Tensor:
        c = self.config
        B, S, D = x_BSD.shape
        h_BSD = x_BSD
        candidates_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        depth_BS = torch.zeros(B, S, device=x_BSD.device)
        fractions, agreement = [], []
        schedule = c.warmed(self.step) if self.training else c.schedule()
        for r, cap in enumerate(schedule):
            logit_BS = F.linear(h_BSD.float(), self._router(r).weight.float())[..., 0] / c.temperature
            k = min(token_count(cap, S), int(candidates_BS.sum(1).min()))
            pos_BK = select_tokens(logit_BS, k, candidates_BS)
            selected_BS = torch.zeros_like(candidates_BS).scatter_(1, pos_BK, True)
            decision_BS = self._decision_logit(r, h_BSD, logit_BS)
            if self.training and c.schedule()[r] < 1:
                agree_BS = (decision_BS.detach().sigmoid() > c.threshold) == selected_BS
                agreement.append(agree_BS[candidates_BS].float().mean())
            if ctx is not None:
                ctx.state[POSITIONS_KEY] = pos_BK
                if c.aux_coef > 0:
                    bce = F.binary_cross_entropy_with_logits(decision_BS[candidates_BS],
                                                             selected_BS[candidates_BS].float())
                    name = "mor_router_loss" if self.aux_routers is None else "mor_aux_router_loss"
                    ctx.add_loss(name, c.aux_coef * bce, self.name)
            gate_BK = (c.alpha * logit_BS.sigmoid()).gather(1, pos_BK)[..., None].to(x_BSD.dtype)
            if share is not None:
                share["reuse"] = r > 0
            out_BKD = block(gather_BKD(h_BSD, pos_BK), ctx)
            h_BSD = h_BSD.scatter_add(1, pos_BK[..., None].expand(-1, -1, D), gate_BK * out_BKD)
            candidates_BS, depth_BS = selected_BS, depth_BS + selected_BS
            fractions.append(k / S)
        add_extra(ctx, self.name, fraction_processed=sum(fractions) / len(fractions),
                  mean_depth=depth_BS.mean())
        if agreement:
            add_extra(ctx, self.name, threshold_agreement=torch.stack(agreement).mean())
        return h_BSD

    def _token_choice(self, x_BSD: torch.Tensor, block: Block, ctx: RoutingContext | None,
                      share: dict | None) -> torch.Tensor:
        c, n = self.config, self.config.num_recursions
        B, S, D = x_BSD.shape
        logits_BSN = F.linear(x_BSD.float(), self._router(0).weight.float()) / c.temperature
        probs_BSN = logits_BSN.softmax(-1)
        p_BS, choice_BS = probs_BSN.max(-1)
        depth_BS = choice_BS + 1
        gate_BS = (c.alpha * n * p_BS).to(x_BSD.dtype)
        if ctx is not None and c.balance_coef > 0 and n > 1:
            loss = load_balancing_loss(probs_BSN.reshape(-1, n), choice_BS.reshape(-1, 1))
            ctx.add_loss("mor_balance_loss", c.balance_coef * loss, self.name)
        h_BSD = x_BSD
        fractions = []
        for r in range(n):
            active_BS = depth_BS > r
            counts_B = active_BS.sum(1)
            fractions.append(float(counts_B.sum()) / (B * S))
            if share is not None:
                share["reuse"] = r > 0
            if not bool(active_BS.any()):
                break
            h_BSD = _run_active(h_BSD, active_BS, gate_BS, block, ctx, share)
        add_extra(ctx, self.name, fraction_processed=sum(fractions) / n, mean_depth=depth_BS.float().mean())
        return h_BSD

    def _threshold(self, x_BSD: torch.Tensor, block: Block, ctx: RoutingContext | None,
                   share: dict | None) -> torch.Tensor:
        """Causal expert choice in evaluation: per-token threshold on each step's router (see the module doc)."""
        c = self.config
        h_BSD = x_BSD
        active_BS = torch.ones(x_BSD.shape[:2], dtype=torch.bool, device=x_BSD.device)
        depth_BS = torch.zeros(x_BSD.shape[:2], device=x_BSD.device)
        fractions = []
        for r, cap in enumerate(c.schedule()):
            logit_BS = F.linear(h_BSD.float(), self._router(r).weight.float())[..., 0] / c.temperature
            if cap < 1:  # capacity 1 takes every candidate, as top-k does
                active_BS = active_BS & (self._decision_logit(r, h_BSD, logit_BS).sigmoid() > c.threshold)
            fractions.append(float(active_BS.float().mean()))
            if not bool(active_BS.any()):  # nested sets: no later step has a token either
                fractions += [0.0] * (c.num_recursions - r - 1)
                break
            if share is not None:
                share["reuse"] = r > 0
            gate_BS = (c.alpha * logit_BS.sigmoid()).to(x_BSD.dtype)
            h_BSD = _run_active(h_BSD, active_BS, gate_BS, block, ctx, share)
            depth_BS = depth_BS + active_BS
        add_extra(ctx, self.name, fraction_processed=sum(fractions) / len(fractions), mean_depth=depth_BS.mean())
        return h_BSD


def _run_active(h_BSD: torch.Tensor, active_BS: torch.Tensor, gate_BS: torch.Tensor, block: Block,
                ctx: RoutingContext | None, share: dict | None) -> torch.Tensor:
    """One recursion over the active tokens of each sequence: ``H_t += g_t * Block(H_active)_t`` for active t,
    the block run on each sequence's active subsequence in causal order (one batched call when every sequence
    has as many active tokens, else sequence by sequence; a sequence with none is skipped)."""
    D = h_BSD.shape[-1]
    counts_B = active_BS.sum(1)
    rows: list[tuple[int | None, torch.Tensor]]
    if bool((counts_B == counts_B[0]).all()):
        rows = [(None, active_BS)] if int(counts_B[0]) > 0 else []
    else:
        rows = [(b, active_BS[b:b + 1]) for b in range(active_BS.shape[0]) if int(counts_B[b]) > 0]
    for b, act_RS in rows:
        h_RSD = h_BSD if b is None else h_BSD[b:b + 1]
        pos_RK = act_RS.nonzero()[:, 1].view(act_RS.shape[0], -1)  # row-major: causal order per row
        if ctx is not None:
            ctx.state[POSITIONS_KEY] = pos_RK
        if share is not None:
            share["rows"] = b
        g_RK = (gate_BS if b is None else gate_BS[b:b + 1]).gather(1, pos_RK)[..., None]
        out_RKD = block(gather_BKD(h_RSD, pos_RK), ctx)
        upd_RSD = h_RSD.scatter_add(1, pos_RK[..., None].expand(-1, -1, D), g_RK * out_RKD)
        h_BSD = upd_RSD if b is None else torch.cat([h_BSD[:b], upd_RSD, h_BSD[b + 1:]])
    return h_BSD
