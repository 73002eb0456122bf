"""Routing analysis: per-layer load, entropy, dead experts, co-activation, token-to-expert tables, plots."""

from .plots import save_plots
from .routing import LayerReport, RoutingReport, RoutingTrace, summarize, trace_routing
from .run import analyze, byte_tokenize
from .text import stdlib_sentences

__all__ = ["analyze", "trace_routing", "summarize", "RoutingTrace", "RoutingReport", "LayerReport", "save_plots",
           "byte_tokenize", "stdlib_sentences"]
