"""moekit: Mixture-of-Experts layers, models, training, routing analysis and interop for PyTorch."""

from .experts import ExpertBank, FeedForward
from .layers import MoE, MoEConfig
from .routing import Router, RouterConfig, update_expert_biases
from .types import LayerStats, Routing, RoutingContext

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "Router", "RouterConfig", "Routing", "RoutingContext", "LayerStats",
           "ExpertBank", "FeedForward", "update_expert_biases", "__version__"]
