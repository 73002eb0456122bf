"""Hugging Face transformers interop: patch a loaded model's MoE blocks with moekit layers, convert both ways.

One adapter file per architecture (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS); transformers
names appear only in this package. Importing it does not import transformers; :func:`patch` needs it.

Also here: :mod:`moekit.hf.bert` (turn a BERT encoder's dense FFNs into moekit MoEs: upcycling or splitting)
and :mod:`moekit.hf.tiny` (small random models of every supported architecture, for tests and demos).
"""

from . import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (register adapters)
from .adapter import ADAPTERS, Adapter, ConversionError, adapter_for, convert_block, export_block, register_adapter
from .patch import PatchedMoEBlock, RouterLogits, find_blocks, from_moekit, patch, routing_context, to_moekit, unpatch

__all__ = ["patch", "unpatch", "to_moekit", "from_moekit", "routing_context", "PatchedMoEBlock", "RouterLogits",
           "find_blocks", "Adapter", "ADAPTERS", "adapter_for", "register_adapter", "ConversionError", "convert_block",
           "export_block"]
