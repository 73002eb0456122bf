"""Expert parameter banks."""

from .activations import ACTIVATIONS, Activation, hidden, hidden_backward, is_gated
from .bank import ExpertBank
from .dense import FeedForward

__all__ = ["ExpertBank", "FeedForward", "ACTIVATIONS", "Activation", "hidden", "hidden_backward", "is_gated"]
