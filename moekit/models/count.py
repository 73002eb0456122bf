"""Parameter and FLOP counts: total parameters, active parameters per token and training FLOPs per token.

Definitions (documented here once, used by ``moekit info`` and by the trainer's MFU):

- ``total_params``: every parameter once (a tied embedding counts once).
- ``active_params``: the parameters one token uses. An :class:`~moekit.MoE` layer counts its router, its shared
  experts and ``top_k / num_experts`` of its routed expert bank. A variant module reports its own count through
  an ``active_params() -> int`` method; without one, its MoE children count as above and the rest in full.
- ``matmul_params`` = active parameters that take part in a matrix product: all of them except the input
  embedding table when it is not tied (a tied table is also the output projection).
- ``flops_per_token`` (training, forward + backward) = ``6 * matmul_params + 12 * num_layers * dim * context``:
  Kaplan et al. (arXiv 2001.08361) ``6N`` plus the attention-score term of PaLM (arXiv 2204.02311, app. B),
  counted without the causal discount.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import MoE
from .config import ModelConfig

__all__ = ["ModelCount", "count", "active_params"]


@dataclass(frozen=True)
class ModelCount:
    total_params: int
    active_params: int
    embedding_params: int
    matmul_params: int
    flops_per_token: int  # training: forward + backward

    @property
    def forward_flops_per_token(self) -> int:
        return self.flops_per_token // 3

    def as_dict(self) -> dict[str, int]:
        return {"total_params": self.total_params, "active_params": self.active_params,
                "embedding_params": self.embedding_params, "matmul_params": self.matmul_params,
                "flops_per_token": self.flops_per_token}


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def active_params(module: nn.Module) -> int:
    """Parameters of ``module`` that one token uses (see the module docstring)."""
    own = getattr(module, "active_params", None)
    if callable(own):
        return int(own())
    if isinstance(module, MoE):
        bank = _numel(module.experts.parameters())
        rest = _numel(module.parameters()) - bank
        return rest + bank // module.config.num_experts * module.config.top_k
    return _numel(module.parameters(recurse=False)) + sum(active_params(c) for c in module.children())


def count(model: nn.Module | ModelConfig) -> ModelCount:
    """Counts of a :class:`~moekit.models.LanguageModel` (a config is built on the meta device first)."""
    if isinstance(model, ModelConfig):
        from .lm import LanguageModel
        with torch.device("meta"):
            model = LanguageModel(model)
    cfg = model.config
    assert isinstance(cfg, ModelConfig), "count() expects a moekit LanguageModel or its ModelConfig"
    embedding = cfg.vocab_size * cfg.dim
    active = active_params(model)
    matmul = active if cfg.tie_embeddings else active - embedding
    flops = 6 * matmul + 12 * cfg.num_layers * cfg.dim * cfg.context
    return ModelCount(total_params=_numel(model.parameters()), active_params=active,
                      embedding_params=embedding, matmul_params=matmul, flops_per_token=flops)
