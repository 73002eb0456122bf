"""Model transforms: dense -> MoE upcycling and splitting (more compression transforms to come)."""

from .readme_carve import CarvedFFN, ReadMEMasks, carve_masks, carving_targets
from .upcycle import (DenseFFN, SplitFFN, cluster_neurons, expert_importance, fit_router, moefy, random_partition,
                      set_top_k, sparse_upcycle, split_ffn)

__all__ = ["DenseFFN", "SplitFFN", "sparse_upcycle", "split_ffn", "moefy", "cluster_neurons", "random_partition",
           "expert_importance", "fit_router", "set_top_k", "CarvedFFN", "ReadMEMasks", "carve_masks", "carving_targets"]
