"""Weight-level tools: the tensors a weight pass selects and their parametrizations
(:mod:`~surgery.weights.tensors`), 1-D k-means weight sharing (:mod:`~surgery.weights.kmeans`),
storage sizes and the bit-level packing the compact archive uses (:mod:`~surgery.weights.storage`),
and the per-tensor sensitivity and bit-width analyses (:mod:`~surgery.weights.sensitivity`).
"""
from .kmeans import INITS, cluster_tensor, kmeans_1d, share_tensor, shared_values
from .sensitivity import AnalysisTable, bits_analysis, sensitivity
from .storage import SizeReport, TensorSize, compressed_size
from .tensors import WeightParametrization, finalize, magnitude_mask, weight_tensors

__all__ = ["INITS", "cluster_tensor", "kmeans_1d", "share_tensor", "shared_values", "AnalysisTable", "bits_analysis",
           "sensitivity", "SizeReport", "TensorSize", "compressed_size", "WeightParametrization", "finalize",
           "magnitude_mask", "weight_tensors"]
