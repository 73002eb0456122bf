"""Model transforms: dense -> MoE upcycling and splitting, and compression of trained MoEs (merge, prune,
quantise: ``compress(model, method, calibration)``, ``moekit compress``)."""

from .api import CompressionReport, compress, expert_bytes
from .bank import CompressedBank
from .calibrate import CompressionError, LayerRecord, calibrate
from .methods import METHODS, CompressOptions
from .readme_carve import CarvedFFN, ReadMEMasks, carve_masks, carving_targets
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

__all__ = [
                      "CarvedFFN",
                      "ReadMEMasks",
                      "carve_masks",
                      "carving_targets",
                      "METHODS",
                      "CompressOptions",
                      "CompressedBank",
                      "CompressionError",
                      "CompressionReport",
                      "DenseFFN",
                      "LayerRecord",
                      "SplitFFN",
                      "calibrate",
                      "cluster_neurons",
                      "compress",
                      "expert_bytes",
                      "expert_importance",
                      "fit_router",
                      "moefy",
                      "random_partition",
                      "set_top_k",
                      "sparse_upcycle",
                      "split_ffn",
]
