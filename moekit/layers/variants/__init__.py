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
               moma,
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
from .moma import MoMa, MoMaConfig
from .mor import MixtureOfRecursions, MoRConfig
from .mumoe import MultilinearMoE, MuMoEConfig
from .pr_moe import ResidualMoE, ResidualMoEConfig
from .promoe import ProMoE, ProMoEConfig
from .readme import ReadMEConfig, ReadMEMoE, ReadMEPlanner, RoutingPlan, planner_distillation_loss
from .rmoe import RecurrentRouterMoE, RMoEConfig, tie_recurrent_routers
from .smoe_dropout import SMoEDropout, SMoEDropoutConfig
from .supernet import SupernetConfig, SupernetFFN
from .thor import THOR, THORConfig, add_consistency_loss, consistency_loss
from .topp import TopPConfig, TopPMoE
from .uoe import UnionOfMLPExperts, UoMEConfig

__all__ = ["ChainOfExperts", "CoEConfig", "MoEPlusPlus", "MoEPPConfig", "TopPConfig", "TopPMoE",
           "ResidualMoE", "ResidualMoEConfig", "SMoEDropout", "SMoEDropoutConfig",
           "THOR", "THORConfig", "consistency_loss", "add_consistency_loss",
           "BlockFFN", "BlockFFNConfig",
           "RecurrentRouterMoE", "RMoEConfig", "tie_recurrent_routers",
           "MixtureOfDepths", "MoDConfig", "MixtureOfRecursions", "MoRConfig",
           "GraphOfTokensMoE", "GMoEConfig", "ProMoE", "ProMoEConfig",
           "MultilinearMoE", "MuMoEConfig", "MoFME", "MoFMEConfig", "MoMa", "MoMaConfig",
           "ReadMEConfig", "ReadMEMoE", "ReadMEPlanner", "RoutingPlan", "planner_distillation_loss",
           "DuoFFN", "DuoConfig", "LayerPathRouters", "DrLLMConfig", "TokenPruner", "FTPConfig",
           "UnionOfMLPExperts", "UoMEConfig", "SupernetFFN", "SupernetConfig"]
