"""Model transforms: dense -> MoE upcycling and splitting, and compression of trained MoEs (merge, prune,
quantise: ``compress(model, method, calibration)``, ``moekit compress``)."""

from .api import CompressionReport, compress, expert_bytes
from .bank import CompressedBank
from .calibrate import CompressionError, LayerRecord, calibrate
from .methods import METHODS, CompressOptions
from .upcycle import (DenseFFN, SplitFFN, cluster_neurons, expert_importance, fit_router, moefy, random_partition,
                      set_top_k, sparse_upcycle, split_ffn)

__all__ = ["DenseFFN", "SplitFFN", "sparse_upcycle", "split_ffn", "moefy", "cluster_neurons", "random_partition",
           "expert_importance", "fit_router", "set_top_k", "compress", "CompressionReport", "CompressionError",
           "CompressOptions", "CompressedBank", "LayerRecord", "calibrate", "expert_bytes", "METHODS"]
