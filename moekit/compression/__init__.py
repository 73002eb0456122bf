"""Model transforms: dense -> MoE upcycling and splitting (more compression transforms to come)."""

from .upcycle import (
                      DenseFFN,
                      SplitFFN,
                      cluster_neurons,
                      expert_importance,
                      fit_router,
                      moefy,
                      random_partition,
                      set_top_k,
                      sparse_upcycle,
                      split_ffn,
)

__all__ = ["DenseFFN", "SplitFFN", "sparse_upcycle", "split_ffn", "moefy", "cluster_neurons", "random_partition",
           "expert_importance", "fit_router", "set_top_k"]
