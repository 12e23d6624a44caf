"""Graph passes, one method each. Each pass is a dataclass with ``apply(gm, ctx) -> gm``."""
from .identity import Identity, OnesMask

__all__ = ["Identity", "OnesMask"]
from .activations import CompressActivations, CompressedRegion, strip_compression  # noqa: E402
__all__ += ["CompressActivations", "CompressedRegion", "strip_compression"]
