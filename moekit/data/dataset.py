"""Token streams for training and validation, and the batches drawn from them.

Dim legend: B batch, S sequence (the model's context).

Training batches are random windows whose positions are a pure function of ``(seed, step, micro-step)``, so
a resumed run draws exactly the batches an uninterrupted one would. Validation uses fixed, evenly spaced,
non-overlapping windows of the validation stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import cast

import torch

from ..configs import ConfigError
from .config import DataConfig
from .corpus import read_files, split_files, stdlib_files, text_files
from .multimodal import MultimodalTokenizer, multimodal_stream
from .synthetic import arithmetic_text, mixture_text
from .tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = ["TokenData", "load_data", "train_batch", "val_batches", "tokenizer_for"]


@dataclass
class TokenData:
    """Training and validation token streams (1-D tensors) and how to turn them back into text.

    ``bytes_per_token`` (validation text bytes / tokens) converts a loss per token into bits per byte.
    """

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: ByteTokenizer | HFTokenizer | MultimodalTokenizer
    bytes_per_token: float
    description: str


def _to_tensor(ids) -> torch.Tensor:
    if isinstance(ids, (bytes, bytearray)):
        # frombuffer refuses an empty buffer; an empty stream is reported by load_data
        return torch.frombuffer(bytearray(ids), dtype=torch.uint8) if ids else torch.empty(0, dtype=torch.uint8)
    return torch.tensor(ids, dtype=torch.int32)


def _encode(tokenizer, text: bytes) -> tuple[torch.Tensor, int]:
    if isinstance(tokenizer, ByteTokenizer):
        return _to_tensor(text), len(text)
    return _to_tensor(tokenizer.encode(text)), len(text)


def _raw_texts(cfg: DataConfig) -> tuple[bytes, bytes, str]:
    """Training and validation bytes for the file-based and synthetic sources."""
    budget = cfg.max_bytes
    tr_budget = None if budget is None else int(budget * (1 - cfg.val_fraction))
    va_budget = None if budget is None else max(1, int(budget * cfg.val_fraction))
    if cfg.source in ("stdlib", "mixture", "text"):
        files = (text_files(cast(str, cfg.path), cfg.max_files) if cfg.source == "text"  # checked by DataConfig
                 else stdlib_files(cfg.max_files))
        if cfg.source == "text" and len(files) == 1:  # one file: its tail is the validation part
            data = read_files(files, budget)
            cut = int(len(data) * (1 - cfg.val_fraction))
            return data[:cut], data[cut:], f"{files[0][1]} ({len(data):,} bytes; last {cfg.val_fraction:.0%} val)"
        train_files, val_files = split_files(files, cfg.val_fraction)
        train, val = read_files(train_files, tr_budget), read_files(val_files, va_budget)
        what = "Python standard library source" if cfg.source != "text" else str(cfg.path)
        desc = f"{what}: {len(train_files)} train / {len(val_files)} val files"
        if cfg.source != "mixture":
            return train, val, desc
        n_val = max(1000, int(cfg.synthetic_bytes * cfg.val_fraction))
        return (mixture_text(cfg.seed * 2, cfg.synthetic_bytes, train, cfg.max_digits),
                mixture_text(cfg.seed * 2 + 1, n_val, val, cfg.max_digits),
                f"mixture of arithmetic, copy, sort and {desc}")
    n_val = max(1000, int(cfg.synthetic_bytes * cfg.val_fraction))
    return (arithmetic_text(cfg.seed * 2, cfg.synthetic_bytes, cfg.max_digits),
            arithmetic_text(cfg.seed * 2 + 1, n_val, cfg.max_digits),
            f"arithmetic up to {cfg.max_digits} digits (seed {cfg.seed})")


def tokenizer_for(cfg: DataConfig) -> ByteTokenizer | HFTokenizer | MultimodalTokenizer:
    """The tokenizer a run of ``cfg`` uses (the ``multimodal`` source adds its image codes to the bytes)."""
    return MultimodalTokenizer(cfg.image_codes) if cfg.source == "multimodal" else get_tokenizer(cfg.tokenizer)


def _multimodal_data(cfg: DataConfig) -> TokenData:
    """Text snippets of the stdlib's train / val files interleaved with captioned synthetic images."""
    if cfg.tokenizer != "bytes":
        raise ConfigError(f"data.source='multimodal' is byte-level with image codes above 256; "
                          f"data.tokenizer={cfg.tokenizer!r} is not supported there; set data.tokenizer=bytes")
    cfg_text = DataConfig(source="stdlib", val_fraction=cfg.val_fraction, max_files=cfg.max_files,
                          max_bytes=cfg.max_bytes, seed=cfg.seed)
    train_b, val_b, desc = _raw_texts(cfg_text)
    n_val = max(1000, int(cfg.synthetic_bytes * cfg.val_fraction))
    kw = dict(codes=cfg.image_codes, patches=cfg.image_patches)
    train = multimodal_stream(cfg.seed * 2, cfg.synthetic_bytes, train_b, **kw)
    val = multimodal_stream(cfg.seed * 2 + 1, n_val, val_b, **kw)
    return TokenData(train=train, val=val, tokenizer=MultimodalTokenizer(cfg.image_codes), bytes_per_token=1.0,
                     description=f"{desc} interleaved with captioned images of {cfg.image_patches} patches over "
                                 f"{cfg.image_codes} codes (ids 256+; bits/byte = bits/token)")


def load_data(cfg: DataConfig) -> TokenData:
    """Read or generate the data of ``cfg`` (nothing is downloaded or cached)."""
    if cfg.source == "multimodal":
        return _multimodal_data(cfg)
    tokenizer = get_tokenizer(cfg.tokenizer)
    if cfg.source == "hf":
        from .hf import hf_documents
        train_docs, val_docs = hf_documents(cast(str, cfg.path), cfg.hf_split, cfg.hf_text_field, cfg.val_fraction,
                                            cfg.max_files)
        train_b = "\n".join(train_docs).encode("utf-8")[: cfg.max_bytes]
        val_b = "\n".join(val_docs).encode("utf-8")[: cfg.max_bytes]
        desc = f"{cfg.path} [{cfg.hf_split}]: {len(train_docs)} train / {len(val_docs)} val documents"
    else:
        train_b, val_b, desc = _raw_texts(cfg)
    train, _ = _encode(tokenizer, train_b)
    val, val_bytes = _encode(tokenizer, val_b)
    if len(val) == 0 or len(train) == 0:
        raise ConfigError(f"data {desc!r} left an empty training or validation part; "
                          f"raise data.max_files / data.max_bytes or data.val_fraction")
    return TokenData(train=train, val=val, tokenizer=tokenizer, bytes_per_token=val_bytes / len(val),
                     description=desc)


def _check_length(stream: torch.Tensor, context: int, what: str) -> None:
    if len(stream) < context + 2:
        raise ConfigError(f"the {what} data has {len(stream)} tokens, fewer than model.context={context} + 2; "
                          f"use more data (data.max_bytes, data.max_files, data.val_fraction) or a shorter context")


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_batch(data: TokenData, batch_size: int, context: int, seed: int, step: int,
                micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``[B, S]`` (int64) for one micro-batch, a function of its indices."""
    _check_length(data.train, context, "training")
    gen = torch.Generator().manual_seed(_seed(seed, step, micro))
    starts_B = torch.randint(0, len(data.train) - context - 1, (batch_size,), generator=gen)
    window_BS = data.train[starts_B[:, None] + torch.arange(context + 1)].long()
    return window_BS[:, :-1], window_BS[:, 1:]


def val_batches(data: TokenData, batch_size: int, context: int, num_batches: int):
    """Yield up to ``num_batches`` fixed batches of evenly spaced, non-overlapping validation windows."""
    _check_length(data.val, context, "validation")
    available = (len(data.val) - 1) // context
    num_windows = min(num_batches * batch_size, available)
    # stride >= context because num_windows <= (len - 1) // context: the windows never overlap.
    stride = (len(data.val) - context - 1) // max(num_windows - 1, 1)
    starts = torch.arange(num_windows) * stride
    for i in range(0, num_windows, batch_size):
        window_BS = data.val[starts[i:i + batch_size, None] + torch.arange(context + 1)].long()
        yield window_BS[:, :-1], window_BS[:, 1:]
