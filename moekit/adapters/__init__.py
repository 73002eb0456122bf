"""Mixture-of-adapter fine-tuning of frozen models (LoRA and the LoRA-MoE family).

``apply(model, method, targets=..., **config)`` injects adapters in place and freezes the rest; ``state_dict``,
``save``, ``load`` hold only adapter and router tensors (safetensors with a header naming method, config and the
adapted shapes); ``merge`` folds a single-adapter result (LoRA, MHR-μ) back into the base weights. Several methods
may sit on disjoint modules of one model (apply again). Methods: see :func:`available` and ``docs/adapters.md``.
"""

from .api import (
                  FORMAT,
                  AdapterError,
                  AdapterGroup,
                  Adapters,
                  adapters_of,
                  apply,
                  available,
                  convert,
                  load,
                  merge,
                  read_header,
                  save,
                  state_dict,
)
from .core import AdaptedFFN, AdaptedLinear, Session
from .flylora import FlyLoRA, FlyLoRAConfig
from .glider import Glider, GliderConfig, set_query
from .lora import LoRA, LoRAConfig
from .mhr import MHR, MHRConfig
from .mixlora import MixLoRA, MixLoRAConfig
from .rank1 import Rank1Config, Rank1Experts
from .routed import DynMoLE, DynMoLEConfig, LoRAMixer, LoRAMixerConfig

__all__ = [
                  "FORMAT",
                  "MHR",
                  "AdaptedFFN",
                  "AdaptedLinear",
                  "AdapterError",
                  "AdapterGroup",
                  "Adapters",
                  "DynMoLE",
                  "DynMoLEConfig",
                  "FlyLoRA",
                  "FlyLoRAConfig",
                  "Glider",
                  "GliderConfig",
                  "LoRA",
                  "LoRAConfig",
                  "LoRAMixer",
                  "LoRAMixerConfig",
                  "MHRConfig",
                  "MixLoRA",
                  "MixLoRAConfig",
                  "Rank1Config",
                  "Rank1Experts",
                  "Session",
                  "adapters_of",
                  "apply",
                  "available",
                  "convert",
                  "load",
                  "merge",
                  "read_header",
                  "save",
                  "set_query",
                  "state_dict",
]
