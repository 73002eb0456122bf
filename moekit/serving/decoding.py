"""Decoding methods that change routing at inference time: SCMoE self-contrast and Rewiring-on-the-fly.

Dim legend: T tokens, E experts, K slots per token, B batch, S sequence, V vocabulary.

**SCMoE** (Shi et al. 2024, "Unchosen Experts Can Contribute Too", github DavidFanzz/SCMoE; spec
``architectures.md`` §14). The same MoE is run twice per step: strong routing (the model's own top-k) gives
log-probabilities ``z_s``, weak *rank routing* (only the experts at the given score ranks, their probabilities
renormalised) gives ``z_w``. The next token is::

    argmax_v  (1 + beta) z_s[v] - beta z_w[v]   over  V = {v : z_s[v] >= max z_s + log alpha}

(greedy; defaults ``alpha = 0.1``, ``beta = 0.5``, weak ranks ``(2,)`` as in the README's example). Each routing
keeps its own KV cache. ``beta = 0`` is greedy decoding.

**Rewiring experts on the fly** (Su et al. 2025; spec ``architectures.md`` §15, abstract only). Additive offsets
``delta_l`` on the router logits of each MoE layer, the only trainable tensors, are fitted by a few Adam steps to
the next-token NLL of the text so far (the prompt, then every ``every`` generated tokens), and held fixed while
decoding. *Choices made where the spec is unknown*: one ``delta_l in R^E`` per MoE layer, all MoE layers, 5 steps
of Adam at lr 0.05, re-adaptation every 16 tokens. ``delta = 0`` leaves the model unchanged.

Both act on plain :class:`~moekit.MoE` layers by shadowing the instance's ``route`` method inside a ``with``
block; other variants are left alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MoE
from ..models import LanguageModel
from ..types import Routing
from .sampling import generate

__all__ = ["contrast_next", "rank_routing", "rewire", "rewiring_generate", "router_offsets", "scmoe_generate"]


def _moes(model: nn.Module) -> list[MoE]:
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("the model has no moekit.MoE layers; SCMoE and rewiring change MoE routing")
    return moes


@contextlib.contextmanager
def rank_routing(model: nn.Module, ranks: Sequence[int]) -> Iterator[None]:
    """Inside the block, every MoE layer uses the experts at score ranks ``ranks`` (0 = best), renormalised."""
    moes = _moes(model)
    ranks = list(ranks)
    num_experts = min(m.config.num_experts for m in moes)
    if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < num_experts for r in ranks):
        raise ValueError(f"weak ranks {ranks} must be distinct ranks in 0..{num_experts - 1}")

    def make(moe: MoE):
        original = moe.route

        def route(x_TD: torch.Tensor, ctx=None, num_sequences: int = 1) -> Routing:
            r = original(x_TD, ctx, num_sequences)
            ids_TK = r.scores_TE.argsort(dim=-1, descending=True, stable=True)[:, ranks]
            w_TK = r.scores_TE.gather(-1, ids_TK)
            return Routing(expert_ids_TK=ids_TK, weights_TK=w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20),
                           scores_TE=r.scores_TE, logits_TE=r.logits_TE)
        return route

    for moe in moes:
        moe.route = make(moe)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for moe in moes:
            del moe.route


def contrast_next(strong_BV: torch.Tensor, weak_BV: torch.Tensor, alpha: float = 0.1,
                  beta: float = 0.5) -> torch.Tensor:
    """SCMoE's greedy choice ``[B]`` from strong and weak logits (any shift per row: log-softmax is taken)."""
    if not 0 < alpha <= 1 or beta < 0:
        raise ValueError(f"SCMoE needs 0 < alpha={alpha} <= 1 and beta={beta} >= 0")
    z_s, z_w = F.log_softmax(strong_BV.float(), -1), F.log_softmax(weak_BV.float(), -1)
    plausible_BV = z_s >= z_s.max(-1, keepdim=True).values + math.log(alpha)
    score_BV = ((1 + beta) * z_s - beta * z_w).masked_fill(~plausible_BV, -math.inf)
    return score_BV.argmax(-1)


@torch.no_grad()
def scmoe_generate(model: LanguageModel, prompt_BS: torch.Tensor, max_new_tokens: int, *,
                   weak_ranks: Sequence[int] = (2,), alpha: float = 0.1, beta: float = 0.5) -> torch.Tensor:
    """Prompt plus ``max_new_tokens`` SCMoE tokens, ``[B, S + max_new_tokens]`` (two KV caches)."""
    if prompt_BS.dim() != 2 or prompt_BS.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {tuple(prompt_BS.shape)}")
    context = model.config.context
    was_training = model.training
    model.eval()
    tokens_BS = prompt_BS
    cached = getattr(model, "supports_kv_cache", True) and prompt_BS.shape[1] + max_new_tokens <= context
    caches = (model.new_cache(prompt_BS.shape[0]), model.new_cache(prompt_BS.shape[0])) if cached else None
    pending_BS = tokens_BS[:, -context:]
    try:
        for _ in range(max_new_tokens):
            if caches is None:
                window = tokens_BS[:, -context:]
                strong, _ = model(window)
                with rank_routing(model, weak_ranks):
                    weak, _ = model(window)
            else:
                strong, _ = model(pending_BS, cache=caches[0])
                with rank_routing(model, weak_ranks):
                    weak, _ = model(pending_BS, cache=caches[1])
            next_B = contrast_next(strong[:, -1], weak[:, -1], alpha, beta)
            tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
            pending_BS = next_B[:, None]
    finally:
        model.train(was_training)
    return tokens_BS


@contextlib.contextmanager
def router_offsets(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Inside the block, MoE layer ``l`` routes on ``logits + delta_l``; yields the ``delta_l`` (zeros, ``[E]``)."""
    moes = _moes(model)
    deltas = [nn.Parameter(torch.zeros(m.config.num_experts, device=m.router.weight.device)) for m in moes]

    def make(moe: MoE, delta_E: nn.Parameter):
        def route(x_TD: torch.Tensor, ctx=None, num_sequences: int = 1) -> Routing:
            x_TD = moe._flatten(x_TD)
            logits_TE = moe.router.logits(x_TD) + delta_E
            return moe.router(x_TD, ctx, layer=moe.name, num_sequences=num_sequences, logits_TE=logits_TE)
        return route

    for moe, delta in zip(moes, deltas):
        moe.route = make(moe, delta)  # type: ignore[method-assign]
    try:
        yield deltas
    finally:
        for moe in moes:
            del moe.route


def context_nll(model: LanguageModel, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``tokens_BS`` (its last ``context`` positions)."""
    window = tokens_BS[:, -model.config.context:]
    logits_BSV, _ = model(window)
    return F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), window[:, 1:].flatten())


def rewire(model: LanguageModel, tokens_BS: torch.Tensor, deltas: Sequence[nn.Parameter], *, steps: int = 5,
           lr: float = 0.05) -> tuple[float, float]:
    """Fit ``deltas`` (only they change) to the NLL of ``tokens_BS``; ``(NLL before, NLL after)``."""
    if tokens_BS.shape[1] < 2:
        return math.nan, math.nan  # nothing to predict yet
    if steps < 0 or lr <= 0:
        raise ValueError(f"rewiring needs steps={steps} >= 0 and lr={lr} > 0")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(deltas, lr=lr)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = float(context_nll(model, tokens_BS))
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = context_nll(model, tokens_BS)
                loss.backward()
                opt.step()
        with torch.no_grad():
            before_after = (before, float(context_nll(model, tokens_BS)))
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return before_after


def rewiring_generate(model: LanguageModel, prompt_BS: torch.Tensor, max_new_tokens: int, *, steps: int = 5,
                      lr: float = 0.05, every: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int | None = None) -> torch.Tensor:
    """Generate with router offsets re-fitted on the prompt and then every ``every`` generated tokens."""
    if every < 1:
        raise ValueError(f"every={every} must be at least 1 (tokens between re-adaptations)")
    tokens_BS = prompt_BS
    with router_offsets(model) as deltas:
        done = 0
        while done < max_new_tokens:
            rewire(model, tokens_BS, deltas, steps=steps, lr=lr)
            n = min(every, max_new_tokens - done)
            tokens_BS = generate(model, tokens_BS, n, temperature=temperature, top_p=top_p,
                                 seed=None if seed is None else seed + done)
            done += n
    return tokens_BS
