"""Graph passes, one method each. Each pass is a dataclass with ``apply(gm, ctx) -> gm``."""
from .activations import CompressActivations, CompressedRegion, strip_compression
from .channel_prune import ChannelPrune, HardMask
from .dam import DAM, DAMMask
from .gumbel import GumbelGate, GumbelMask
from .identity import Identity, OnesMask
from .magnitude import AGP, MagnitudePrune, WeightMask
from .shrink import Shrink
from .sparsifier import Sparsifier, SparsifierModule
from .weight_share import SharedWeight, WeightShare

__all__ = [
    "Identity", "OnesMask",
    "ChannelPrune", "HardMask", "Shrink",
    "DAM", "DAMMask", "GumbelMask", "GumbelGate", "Sparsifier", "SparsifierModule",
    "CompressActivations", "CompressedRegion", "strip_compression",
    "AGP", "MagnitudePrune", "WeightMask", "WeightShare", "SharedWeight",
]
