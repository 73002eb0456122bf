"""Serving: text generation with a KV cache, expert offloading under a memory budget, prefetch, cache
simulation, decoding methods and the HTTP server (``moekit serve``; needs the ``serve`` extra)."""

from .cache import POLICIES, ExpertCache, make_policy
from .offload import PREFETCHERS, ExpertStore, Offload, load_offloaded, parse_budget
from .sampling import generate, sample_next

__all__ = [
           "POLICIES",
           "PREFETCHERS",
           "ExpertCache",
           "ExpertStore",
           "Offload",
           "generate",
           "load_offloaded",
           "make_policy",
           "parse_budget",
           "sample_next",
]
