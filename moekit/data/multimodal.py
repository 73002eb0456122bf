"""A second modality for early-fusion experiments (MoMa, compression-adaptation-serving.md §30): byte text
interleaved with a synthetic stream of discrete image-patch codes, in one vocabulary.

Dim legend: P patches per image, C patch codes (the image modality's vocabulary).

Token ids ``0..255`` are text bytes and ``256..256 + C - 1`` are image-patch codes, so the modality of a token
is a function of its id (``model.modality_starts = [256]``; see :mod:`moekit.models.lm`). No real images are
available offline, so an "image" is a VQ-style code sequence with structure a model can learn: one of
``num_classes`` templates of ``P`` codes (a fixed random pattern per class), each code replaced by a random one
with probability ``noise``, preceded by a text caption ``<img K>`` naming its class (so text predicts image
tokens and the image is predictable from its first patches). Images alternate with snippets of the Python
standard library's source. Every stream is a pure function of its seed.

Bits per byte: an image token counts as one byte (``bytes_per_token`` = 1), so ``val_bpb`` is bits per token.
"""

from __future__ import annotations

import random

import torch

__all__ = ["TEXT_VOCAB", "MultimodalTokenizer", "image_templates", "multimodal_stream"]

TEXT_VOCAB = 256


class MultimodalTokenizer:
    """Bytes for text, ``256 + code`` for image-patch codes; decodes a code as ``<i{code}>``."""

    name = "multimodal"

    def __init__(self, image_codes: int) -> None:
        self.image_codes = image_codes
        self.vocab_size = TEXT_VOCAB + image_codes

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if i < TEXT_VOCAB:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(f"<i{i - TEXT_VOCAB}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


def image_templates(num_classes: int, patches: int, codes: int, seed: int = 1234) -> list[list[int]]:
    """The fixed code pattern of each class (the same for training and validation streams)."""
    rng = random.Random(seed)
    return [[rng.randrange(codes) for _ in range(patches)] for _ in range(num_classes)]


def _snippet(rng: random.Random, text: bytes, low: int = 32, high: int = 160) -> bytes:
    if len(text) <= high:
        return text
    start = rng.randrange(len(text) - high)
    return text[start:start + rng.randint(low, high)]


def multimodal_stream(seed: int, num_tokens: int, source_text: bytes, *, codes: int = 64, patches: int = 16,
                      num_classes: int = 8, noise: float = 0.1, image_share: float = 0.7) -> torch.Tensor:
    """About ``num_tokens`` int32 tokens of text snippets and captioned images (whole items only).

    ``image_share`` is the probability that the next item is an image (else a text snippet).
    """
    if codes < 1 or patches < 1 or num_classes < 1 or not 0.0 <= noise <= 1.0 or not 0.0 <= image_share <= 1.0:
        raise ValueError(f"multimodal_stream: codes={codes}, patches={patches}, num_classes={num_classes} must be "
                         f">= 1 and noise={noise}, image_share={image_share} within [0, 1]")
    rng = random.Random(seed)
    templates = image_templates(num_classes, patches, codes)
    tokens: list[int] = []
    while len(tokens) < num_tokens:
        if rng.random() < image_share or not source_text:
            k = rng.randrange(num_classes)
            tokens.extend(f"<img {k}>".encode("ascii"))
            tokens.extend(TEXT_VOCAB + (c if rng.random() >= noise else rng.randrange(codes)) for c in templates[k])
            tokens.append(ord("\n"))
        else:
            tokens.extend(_snippet(rng, source_text))
    return torch.tensor(tokens, dtype=torch.int32)
