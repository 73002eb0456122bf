"""Batched generation: many prompts of different lengths decoded together with one KV cache.

Dim legend: B batch (requests), S sequence, V vocabulary.

Prompts are left-padded to the longest; the cache records each row's padding (``KVCache.pad_B``), so padding
keys are masked out and each row's rotary positions start at its own first token. Row ``b`` therefore computes
what :func:`~moekit.serving.generate` computes for prompt ``b`` alone (up to float rounding of batched matmuls),
and with the same ``seed`` it draws the same tokens: each row samples with its own generator. Padding tokens run
through the experts (wasted work, never read).

Every row has its own ``max_new_tokens``, temperature and top-p; :meth:`BatchDecoder.finish` ends a row early
(a stop sequence, a closed stream). The whole batch must fit the context: ``len(prompt) + max_new_tokens <=
model.config.context`` (no sliding window here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import LanguageModel
from .sampling import sample_next

__all__ = ["BatchDecoder", "generate_batch"]


def _per_row(value, n: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} prompts; give one per prompt or a single one")
    return values


class BatchDecoder:
    """Step-by-step decoding of a batch: ``step()`` returns the next token of every row (``None`` when done).

    Args:
        model: a :class:`~moekit.models.LanguageModel` that supports a KV cache.
        prompts: token ids per request, at least one each.
        max_new_tokens, temperature, top_p, seed: one value, or one per prompt (``seed=None``: unseeded).
    """

    def __init__(self, model: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 *, temperature: float | Sequence[float] = 0.0, top_p: float | Sequence[float] = 1.0,
                 seed: int | None | Sequence[int | None] = None) -> None:
        n = len(prompts)
        if n == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token, and there must be at least one prompt")
        if not getattr(model, "supports_kv_cache", True):
            raise ValueError("this model routes over the whole sequence (depth routing or a Read-ME planner) and "
                             "has no KV cache; batched generation needs one; use generate(..., use_cache=False)")
        self.model = model
        self.max_new = [int(m) for m in _per_row(max_new_tokens, n, "max_new_tokens")]
        self.temperature = [float(t) for t in _per_row(temperature, n, "temperature")]
        self.top_p = [float(p) for p in _per_row(top_p, n, "top_p")]
        context = model.config.context
        for b, (p, m) in enumerate(zip(prompts, self.max_new)):
            if m < 0 or len(p) + m > context:
                raise ValueError(f"prompt {b}: {len(p)} tokens + max_new_tokens={m} exceed model.context={context}; "
                                 f"shorten the prompt or ask for fewer tokens")
        device = model.embed.weight.device
        self.generators = [None if s is None else torch.Generator(device).manual_seed(int(s))
                           for s in _per_row(seed, n, "seed")]
        length = max(len(p) for p in prompts)
        pad_B = torch.tensor([length - len(p) for p in prompts], device=device)
        self.tokens_BS = torch.tensor([[0] * (length - len(p)) + list(p) for p in prompts], device=device)
        self.cache = model.new_cache(n)
        self.cache.pad_B = pad_B
        self.done = [m == 0 for m in self.max_new]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self._pending_BS = self.tokens_BS

    @property
    def finished(self) -> bool:
        return all(self.done)

    def finish(self, row: int) -> None:
        """Generate nothing more for ``row`` (its slot keeps decoding, unread, until the batch ends)."""
        self.done[row] = True

    @torch.no_grad()
    def step(self) -> list[int | None]:
        """Run one position for every row; the new token per row, ``None`` for rows already done."""
        was_training = self.model.training
        self.model.eval()
        try:
            logits_BSV, _ = self.model(self._pending_BS, cache=self.cache)
        finally:
            self.model.train(was_training)
        logits_BV = logits_BSV[:, -1]
        out: list[int | None] = []
        for b in range(len(self.done)):
            if self.done[b]:
                out.append(None)
                continue
            token = int(sample_next(logits_BV[b:b + 1], self.temperature[b], self.top_p[b], self.generators[b]))
            self.generated[b].append(token)
            self.done[b] = len(self.generated[b]) >= self.max_new[b]
            out.append(token)
        next_B = torch.tensor([o if o is not None else 0 for o in out], device=self.tokens_BS.device)
        self._pending_BS = next_B[:, None]
        return out


def generate_batch(model: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                   temperature: float | Sequence[float] = 0.0, top_p: float | Sequence[float] = 1.0,
                   seed: int | None | Sequence[int | None] = None) -> list[list[int]]:
    """The generated tokens of every prompt (without the prompt), decoded as one batch."""
    decoder = BatchDecoder(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    while not decoder.finished:
        decoder.step()
    return decoder.generated
