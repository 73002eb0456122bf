"""MoE variants: compositions of Router, Engine and ExpertBank, each registered with ``@register_ffn``.

Importing this package registers every variant's builder (``moekit.layers`` imports it).
"""

from . import (  # noqa: F401
               blockffn,
               coe,
               drllm,
               duo,
               ftp,
               gmoe,
               moepp,
               mofme,
               mumoe,
               pr_moe,
               promoe,
               readme,
               rmoe,
               smoe_dropout,
               supernet,
               thor,
               topp,
               uoe,
)
from .blockffn import BlockFFN, BlockFFNConfig
from .coe import ChainOfExperts, CoEConfig
from .drllm import DrLLMConfig, LayerPathRouters
from .duo import DuoConfig, DuoFFN
from .ftp import FTPConfig, TokenPruner
from .gmoe import GMoEConfig, GraphOfTokensMoE
from .mod import MixtureOfDepths, MoDConfig
from .moepp import MoEPlusPlus, MoEPPConfig
from .mofme import MoFME, MoFMEConfig
from .mor import MixtureOfRecursions, MoRConfig
from .mumoe import MultilinearMoE, MuMoEConfig
from .pr_moe import ResidualMoE, ResidualMoEConfig
from .promoe import ProMoE, ProMoEConfig
from .readme import (
               ReadMEConfig,
               ReadMEMoE,
               ReadMEPlanner,
               RoutingPlan,
               planner_distillation_loss,
)
from .rmoe import RecurrentRouterMoE, RMoEConfig, tie_recurrent_routers
from .smoe_dropout import SMoEDropout, SMoEDropoutConfig
from .supernet import SupernetConfig, SupernetFFN
from .thor import THOR, THORConfig, add_consistency_loss, consistency_loss
from .topp import TopPConfig, TopPMoE
from .uoe import UnionOfMLPExperts, UoMEConfig

__all__ = [
               "THOR",
               "BlockFFN",
               "BlockFFNConfig",
               "ChainOfExperts",
               "CoEConfig",
               "DrLLMConfig",
               "DuoConfig",
               "DuoFFN",
               "FTPConfig",
               "GMoEConfig",
               "GraphOfTokensMoE",
               "LayerPathRouters",
               "MixtureOfDepths",
               "MixtureOfRecursions",
               "MoDConfig",
               "MoEPPConfig",
               "MoEPlusPlus",
               "MoFME",
               "MoFMEConfig",
               "MoRConfig",
               "MuMoEConfig",
               "MultilinearMoE",
               "ProMoE",
               "ProMoEConfig",
               "RMoEConfig",
               "ReadMEConfig",
               "ReadMEMoE",
               "ReadMEPlanner",
               "RecurrentRouterMoE",
               "ResidualMoE",
               "ResidualMoEConfig",
               "RoutingPlan",
               "SMoEDropout",
               "SMoEDropoutConfig",
               "SupernetConfig",
               "SupernetFFN",
               "THORConfig",
               "TokenPruner",
               "TopPConfig",
               "TopPMoE",
               "UnionOfMLPExperts",
               "UoMEConfig",
               "add_consistency_loss",
               "consistency_loss",
               "planner_distillation_loss",
               "tie_recurrent_routers",
]
