"""Routing: scorers, selectors, balancing losses and the Router module."""

from .config import RouterConfig
from .losses import load_balancing_loss, z_loss
from .router import Router, update_expert_biases
from .selectors import capacity, limit_capacity, select_expert_choice, select_topk, token_count

__all__ = ["Router", "update_expert_biases", "RouterConfig", "load_balancing_loss", "z_loss", "capacity",
           "limit_capacity", "select_expert_choice", "select_topk", "token_count"]
