"""Graph passes, one method each. Each pass is a dataclass with ``apply(gm, ctx) -> gm``."""
from .identity import Identity, OnesMask

__all__ = ["Identity", "OnesMask"]
from .magnitude import AGP, MagnitudePrune, WeightMask
from .weight_share import SharedWeight, WeightShare
__all__ += ["AGP", "MagnitudePrune", "WeightMask", "SharedWeight", "WeightShare"]
