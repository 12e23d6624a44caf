"""Graph passes, one method each. Each pass is a dataclass with ``apply(gm, ctx) -> gm``."""
from .identity import Identity, OnesMask
from .channel_prune import ChannelPrune, HardMask
from .shrink import Shrink
from .dam import DAM, DAMMask
from .gumbel import GumbelGate, GumbelMask
from .sparsifier import Sparsifier, SparsifierModule

__all__ = ["Identity", "OnesMask", "ChannelPrune", "HardMask", "Shrink"]
__all__ += ["DAM", "DAMMask", "GumbelMask", "GumbelGate", "Sparsifier", "SparsifierModule"]
from .magnitude import AGP, MagnitudePrune, WeightMask
from .weight_share import SharedWeight, WeightShare
__all__ += ["AGP", "MagnitudePrune", "WeightMask", "SharedWeight", "WeightShare"]
