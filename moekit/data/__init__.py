"""Data: built-in corpora (standard-library source, synthetic tasks) and user text, byte-level by default."""

from .config import DataConfig
from .dataset import TokenData, load_data, tokenizer_for, train_batch, val_batches
from .tokenizers import ByteTokenizer, HFTokenizer, get_tokenizer

__all__ = ["DataConfig", "TokenData", "load_data", "train_batch", "val_batches", "ByteTokenizer", "HFTokenizer",
           "get_tokenizer", "tokenizer_for"]
