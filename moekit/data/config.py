"""Configuration of a run's data: where the text comes from, how it is split and tokenized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configs import check, check_choice, check_types

__all__ = ["DataConfig", "SOURCES"]

Source = Literal["stdlib", "arithmetic", "mixture", "text", "hf", "multimodal"]
SOURCES: tuple[str, ...] = ("stdlib", "arithmetic", "mixture", "text", "hf", "multimodal")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where training text comes from.

    Attributes:
        source: ``stdlib`` (the Python standard library's source, byte-level), ``arithmetic`` (synthetic sums
            and products), ``mixture`` (arithmetic + copying + sorting + stdlib snippets), ``text`` (a text
            file or a folder of them at ``path``), ``hf`` (a Hugging Face ``datasets`` name or a dataset saved
            with ``save_to_disk`` at ``path``; needs the ``datasets`` package), ``multimodal`` (stdlib text
            interleaved with captioned synthetic images of patch codes ``256..256 + image_codes - 1``, for
            early-fusion models such as MoMa; see :mod:`moekit.data.multimodal`; needs
            ``model.vocab_size = 256 + image_codes``).
        path: the file, folder or dataset for ``text`` and ``hf``.
        tokenizer: ``bytes`` (vocabulary 256) or a Hugging Face tokenizer name / local folder.
        val_fraction: share held out for validation: by file (stdlib, folders), by document (hf), the tail of
            a single file (text), or the generated size (synthetic).
        max_files: read at most this many files (evenly spread over the sorted list); ``None`` reads all.
        max_bytes: read at most about this many bytes in all; ``None`` reads all.
        seed: seed of the synthetic generators and of the stdlib snippets in ``mixture``.
        synthetic_bytes: size of the generated training text for ``arithmetic`` and ``mixture`` (tokens for
            ``multimodal``).
        max_digits: longest operand of the arithmetic tasks.
        image_codes: patch codes of the ``multimodal`` source's image modality (its vocabulary).
        image_patches: patches per image of the ``multimodal`` source.
        hf_split: split of the Hugging Face dataset to read.
        hf_text_field: column holding the text.
    """

    source: Source = "stdlib"
    path: str | None = None
    tokenizer: str = "bytes"
    val_fraction: float = 0.05
    max_files: int | None = None
    max_bytes: int | None = None
    seed: int = 0
    synthetic_bytes: int = 2_000_000
    max_digits: int = 4
    image_codes: int = 64
    image_patches: int = 16
    hf_split: str = "train"
    hf_text_field: str = "text"

    def __post_init__(self) -> None:
        check_types(self, "data")
        check_choice("data", "source", self.source, SOURCES)
        check(self.source not in ("text", "hf") or bool(self.path),
              f"data.source={self.source!r} needs data.path (a file, folder or dataset name); "
              f"set --data.path=...")
        check(0.0 < self.val_fraction < 1.0,
              f"data.val_fraction={self.val_fraction} must be between 0 and 1 (e.g. 0.05)")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"data.{name}={value} must be positive, or none for no limit")
        check(self.synthetic_bytes >= 1000, f"data.synthetic_bytes={self.synthetic_bytes} is too small; use >= 1000")
        for name in ("image_codes", "image_patches"):
            value = getattr(self, name)
            check(1 <= value <= 65536, f"data.{name}={value} must be between 1 and 65536 (e.g. 64 and 16)")
        check(1 <= self.max_digits <= 30, f"data.max_digits={self.max_digits} must be between 1 and 30")
