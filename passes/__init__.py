"""Graph passes, one method each. Each pass is a dataclass with ``apply(gm, ctx) -> gm``."""
from .identity import Identity, OnesMask
from .channel_prune import ChannelPrune, HardMask
from .shrink import Shrink

__all__ = ["Identity", "OnesMask", "ChannelPrune", "HardMask", "Shrink"]
