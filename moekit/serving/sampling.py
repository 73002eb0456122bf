"""Text generation: greedy, temperature and nucleus (top-p) sampling, with or without a KV cache.

Dim legend: B batch, S sequence, V vocabulary.

With the cache, the prompt is run once (prefill) and each new token costs one position. Once the sequence is
longer than the model's context, both paths condition on the last ``context`` tokens (a sliding window); the
cached path then re-runs that window each step, as the uncached path always does, so both give the same
tokens. (A layer with a capacity limit in eval mode can route differently for 1 token than for a window.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["generate", "sample_next"]


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]``: argmax when ``temperature == 0``, else a draw from the (top-p) distribution.

    Top-p (Holtzman et al., arXiv 1904.09751) keeps the smallest set of most likely tokens whose probability
    reaches ``top_p``.
    """
    if not temperature >= 0 or temperature == float("inf") or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop_BV = sorted_BV.cumsum(-1) - sorted_BV >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt_BS: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, use_cache: bool = True, seed: int | None = None) -> torch.Tensor:
    """The prompt followed by ``max_new_tokens`` generated tokens, ``[B, S + max_new_tokens]``.

    Args:
        model: a :class:`~moekit.models.LanguageModel` (put in eval mode while generating).
        prompt_BS: int64 token ids, at least one per row.
        seed: seeds the sampler's own generator (the global RNG is not touched).
    """
    if prompt_BS.dim() != 2 or prompt_BS.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {tuple(prompt_BS.shape)}")
    lm: Any = model  # a LanguageModel, or any model with its config, new_cache and (logits, ctx) forward
    context = lm.config.context
    gen = None if seed is None else torch.Generator(prompt_BS.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    tokens_BS = prompt_BS
    # models that route over the whole sequence (depth routing, Read-ME planning) recompute instead
    use_cache = use_cache and getattr(model, "supports_kv_cache", True)
    cache = lm.new_cache(prompt_BS.shape[0]) if use_cache else None
    pending_BS = tokens_BS[:, -context:]
    try:
        for _ in range(max_new_tokens):
            if cache is None:
                logits_BSV, _ = model(tokens_BS[:, -context:])
            else:
                if cache.length + pending_BS.shape[1] > context:  # window full: re-run the last `context`
                    cache, pending_BS = lm.new_cache(tokens_BS.shape[0]), tokens_BS[:, -context:]
                logits_BSV, _ = model(pending_BS, cache=cache)
            next_B = sample_next(logits_BSV[:, -1], temperature, top_p, gen)
            tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
            pending_BS = next_B[:, None]
    finally:
        model.train(was_training)
    return tokens_BS
