"""Run text through a model and report its routing: :func:`analyze`.

Works on moekit models (``forward(tokens)``) and on transformers models patched by :func:`moekit.hf.patch`
(``forward(input_ids=..., attention_mask=...)``). Padding tokens are left out of every statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .routing import RoutingReport, summarize, trace_routing

__all__ = ["analyze", "byte_tokenize"]


def byte_tokenize(texts: Sequence[str], vocab_size: int, max_length: int) -> tuple[list[list[int]], Callable]:
    """UTF-8 bytes as token ids (folded into ``vocab_size`` when it is below 256), and their decoder."""
    ids = [[b % vocab_size for b in t.encode()[:max_length]] for t in texts]
    return ids, (lambda i: bytes([i]).decode("latin-1") if vocab_size >= 256 else f"<{i}>")


def _tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], Callable]:
    """A transformers tokenizer, or any object with ``encode(text) -> ids`` and ``decode(ids) -> text``."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        return ids, (lambda i: tokenizer.convert_ids_to_tokens(int(i)))
    return [tokenizer.encode(t)[:max_length] for t in texts], (lambda i: tokenizer.decode([int(i)]))


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def analyze(model: nn.Module, texts: Sequence[str], *, tokenizer=None, batch_size: int = 8,
            max_length: int = 128, per_expert: int = 8, min_count: int = 3,
            forward: Callable[[torch.Tensor, torch.Tensor], object] | None = None,
            progress: Callable[[int, int], None] | None = None) -> RoutingReport:
    """Route ``texts`` through ``model`` and summarise per layer.

    Args:
        model: a moekit model, or a transformers model after :func:`moekit.hf.patch`.
        texts: the text to analyse.
        tokenizer: a transformers tokenizer, or a moekit one (``encode``/``decode``); without one, UTF-8
            bytes are the tokens.
        batch_size / max_length: batching of the forward passes (right-padded, padding ignored).
        per_expert / min_count: for the token table, how many tokens to keep per expert, and how often a
            token must occur to be ranked by the share of its occurrences sent to an expert.
        forward: ``fn(ids_BS, mask_BS)`` running the model, when neither calling convention fits.
        progress: called as ``progress(passages done, passages)`` after each forward pass.
    """
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) or getattr(model, "vocab_size", None) or 256
    context = getattr(cfg, "context", None) or getattr(cfg, "max_position_embeddings", None)
    max_length = min(max_length, context) if isinstance(context, int) else max_length
    ids, decode = (_tokenize(tokenizer, texts, max_length) if tokenizer is not None
                   else byte_tokenize(texts, vocab, max_length))
    ids = [seq for seq in ids if seq]
    if forward is None:
        if _is_transformers(model):
            forward = lambda x, m: model(input_ids=x, attention_mask=m)  # noqa: E731
        else:
            forward = lambda x, m: model(x)  # noqa: E731
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor | None] = {"mask": None}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), trace_routing(model, keep=lambda: state["mask"]) as trace:
            for start in range(0, len(ids), batch_size):
                batch = ids[start:start + batch_size]
                S = max(len(s) for s in batch)
                x = torch.zeros(len(batch), S, dtype=torch.long)
                mask = torch.zeros(len(batch), S, dtype=torch.long)
                for b, seq in enumerate(batch):
                    x[b, : len(seq)] = torch.tensor(seq)
                    mask[b, : len(seq)] = 1
                state["mask"] = mask.reshape(-1).bool().to(device)
                trace.tokens.append(x.reshape(-1)[mask.reshape(-1).bool()])
                forward(x.to(device), mask.to(device))
                if progress is not None:
                    progress(start + len(batch), len(ids))
    finally:
        model.train(was_training)
    return summarize(trace, decode, per_expert=per_expert, min_count=min_count)
