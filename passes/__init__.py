"""Graph passes, one method each. Each pass is a dataclass with ``apply(gm, ctx) -> gm``."""
from .identity import Identity, OnesMask

__all__ = ["Identity", "OnesMask"]
