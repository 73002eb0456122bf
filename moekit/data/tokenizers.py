"""Tokenizers: raw UTF-8 bytes (vocabulary 256), or a Hugging Face tokenizer when one is asked for."""

from __future__ import annotations

from ..configs import ConfigError

__all__ = ["ByteTokenizer", "HFTokenizer", "get_tokenizer"]


class ByteTokenizer:
    """Token ids are the bytes of the UTF-8 text."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers.AutoTokenizer``); offline, so a local folder or a cached name."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"data.tokenizer={name!r} needs transformers; pip install 'moekit[hf]' "
                              f"or use data.tokenizer=bytes") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001  (transformers raises many kinds; all mean "not available")
            raise ConfigError(f"cannot load tokenizer {name!r} ({type(e).__name__}: {e}); give a local "
                              f"tokenizer folder or use data.tokenizer=bytes") from None
        self.name = name
        self.vocab_size = len(self._tok)

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
