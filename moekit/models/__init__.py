"""The decoder-only language model, its config, KV cache and parameter / FLOP counts."""

from .attention import Attention, KVCache
from .config import ModelConfig
from .count import ModelCount, active_params, count
from .lm import Block, LanguageModel

__all__ = ["ModelConfig", "LanguageModel", "Block", "Attention", "KVCache", "ModelCount", "count",
           "active_params"]
