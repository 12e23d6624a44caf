"""Codecs for tensors saved for backward: each packs a tensor into compact storage and unpacks it
back, on the tensor's own device and in its own dtype (transforms run in float32 for 16-bit
inputs). Nothing is copied to the CPU and no index is stored as int64.

Every codec is a small frozen dataclass with ``pack(x) -> packed`` and ``unpack(packed) -> Tensor``.
``pack`` never returns a bare Tensor except for :class:`NoCodec` (whose unpack is the identity)
and :class:`~passes.packing.IntegerCodec` where no narrower form holds the tensor, so a caller can tell a
pass-through tensor from a packed one. The float codecs but :class:`NoCodec` are lossy
(threshold, dct and wavelet give the tensor back to float rounding at ``keep=1.0``);
:class:`~passes.packing.IntegerCodec`, for the integer and bool tensors saved beside the floats, is exact.

Example::

    >>> import torch
    >>> c = DCTCodec(keep=1.0)
    >>> x = torch.randn(2, 3, 10, 12)
    >>> bool(torch.allclose(c.unpack(c.pack(x)), x, atol=1e-5))
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.errors import ConfigError

from . import _fields as check
from .packing import Sparse, bits_as, keep_largest, pack_bits, zero_outside_
from .transforms import as_planes, check_wavelet, dwt_flat, dwt_flat_inverse, tiled_dct, tiled_dct_inverse

__all__ = ["NoCodec", "RandomCodec", "ThresholdCodec", "DCTCodec", "WaveletCodec", "QuantCodec", "make_codec",
           "METHODS", "check_keep", "check_wavelet", "check_group_size"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # transforms of 16-bit tensors run in float32; float64 stays float64
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------- the codecs
@dataclass(frozen=True)
class NoCodec:
    """Stores the tensor itself: bit-identical to running without hooks."""

    name = "none"

    def pack(self, x: Tensor) -> Tensor:
        return x

    def unpack(self, p: Tensor) -> Tensor:
        return p


@dataclass
class _Shape:
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class RandomCodec:
    """The reference baseline: stores only shape, dtype and device; unpacks standard-normal noise."""

    name = "random"

    def pack(self, x: Tensor) -> _Shape:
        return _Shape(x.shape, x.dtype, x.device)

    def unpack(self, p: _Shape) -> Tensor:
        return torch.randn(p.shape, dtype=p.dtype, device=p.device)


@dataclass
class _SparsePacked:
    coeffs: Sparse
    shape: torch.Size
    dtype: torch.dtype
    layout: tuple = ()  # transform bookkeeping (python ints only)
    support: Tensor | None = None  # bitmask of nonzeros of a ReLU-like tensor


def _support(x: Tensor) -> Tensor | None:
    """For a non-negative tensor with exact zeros (a ReLU output), the bitmask of its nonzeros.

    ReLU's backward reads only ``result > 0`` from what it saved; a lossy (or merely inexact)
    reconstruction turns zeros into small positives and lets gradient leak into dead units.
    One bit per value keeps that pattern exact. (One host sync: the test is data-dependent.)
    """
    if x.numel() == 0 or x.amin().item() != 0:  # negative entries, or no zero
        return None
    return pack_bits(x.bool())  # nonzero is positive here (and bool() is 4x faster than > 0)


def _sparse_pack(x: Tensor, coeffs: Tensor, keep: float, layout: tuple = (), exact: bool = False,
                 own: bool = False) -> _SparsePacked:
    """`coeffs` (x's transform, or with `own` x's values themselves) kept sparse; for a ReLU
    output, also its support. A ReLU output's own values are non-negative."""
    support = _support(x)
    sparse = keep_largest(coeffs, keep, x.dtype, x.numel(), exact, nonnegative=own and support is not None)
    return _SparsePacked(sparse, x.shape, x.dtype, layout, support)


def positive_floor(dtype: torch.dtype) -> float:
    """The value a dropped positive entry of a ReLU output comes back as: small enough to be
    nothing next to the kept values, large enough that its products with gradients stay normal
    floats. (The smallest normal, 1e-38 in float32, made conv backward run on subnormals: 4-8x
    slower on CPUs without flush-to-zero.) 2^-64 in float32, float64 and bfloat16; float16's
    smallest normal, 6e-5."""
    return max(torch.finfo(dtype).tiny, 2.0 ** -64)


def _sparse_finish(y: Tensor, p: _SparsePacked) -> Tensor:
    """A transform's reconstruction `y` as the saved tensor: its shape and dtype, and for a ReLU
    output its zero pattern (positives at least :func:`positive_floor`, zeros exactly zero)."""
    y = y.to(p.dtype).reshape(p.shape)
    if p.support is None:
        return y
    y = y.clamp_min_(positive_floor(p.dtype))  # y is the inverse transform's own fresh tensor
    return zero_outside_(y, p.support)


def check_keep(owner: str, keep: Any) -> None:
    """ConfigError unless `keep` (the fraction of values or coefficients kept) is in (0, 1]."""
    check.number(owner, "keep", keep, lo=0, lo_open=True, hi=1)


def check_group_size(owner: str, group_size: Any) -> None:
    """ConfigError unless `group_size` is an even integer in [2, 2^24] (int4 packs code pairs)."""
    allowed = "expected an even integer in [2, 16777216] (int4 packs two codes per byte)"
    try:
        check.number(owner, "group_size", group_size, lo=2, hi=1 << 24, integer=True)
    except ConfigError:
        raise ConfigError(owner, "group_size", group_size, allowed) from None
    if group_size % 2:
        raise ConfigError(owner, "group_size", group_size, allowed)


@dataclass(frozen=True)
class ThresholdCodec:
    """Keeps the `keep` fraction of values with the largest magnitude, zero elsewhere (about that
    fraction, by a sampled threshold, unless `exact`: see :func:`~passes.packing.keep_largest`)."""

    keep: float = 0.05
    exact: bool = False
    name = "threshold"

    def __post_init__(self) -> None:
        check_keep("ThresholdCodec", self.keep)
        check.flag("ThresholdCodec", "exact", self.exact)

    def pack(self, x: Tensor) -> _SparsePacked:
        return _sparse_pack(x, x.reshape(-1), self.keep, exact=self.exact, own=True)

    def unpack(self, p: _SparsePacked) -> Tensor:
        if p.support is None:
            return p.coeffs.dense(p.dtype).view(p.shape)
        # a ReLU output: the floor on its support, then the kept values (all positive) on top
        floor = bits_as(p.support, p.coeffs.numel, positive_floor(p.dtype), p.dtype)
        return p.coeffs.dense(p.dtype, base=floor).view(p.shape)


@dataclass(frozen=True)
class DCTCodec:
    """Orthonormal 2-D DCT-II over the last two dims (H x W) in `block` x `block` tiles (a side
    shorter than `block` is one tile; other sides are zero padded to a multiple of the block);
    keeps the ceil(keep * numel) largest coefficients (about as many unless `exact`)."""

    keep: float = 0.05
    block: int = 8
    exact: bool = False
    name = "dct"

    def __post_init__(self) -> None:
        check_keep("DCTCodec", self.keep)
        check.number("DCTCodec", "block", self.block, lo=1, integer=True)
        check.flag("DCTCodec", "exact", self.exact)

    def pack(self, x: Tensor) -> _SparsePacked:
        coeffs, layout = tiled_dct(as_planes(x).to(_work_dtype(x.dtype)), self.block)
        return _sparse_pack(x, coeffs.reshape(-1), self.keep, layout, self.exact)

    def unpack(self, p: _SparsePacked) -> Tensor:
        return _sparse_finish(tiled_dct_inverse(p.coeffs.dense(_work_dtype(p.dtype)), p.layout), p)


@dataclass(frozen=True)
class WaveletCodec:
    """Multi-level 2-D periodized DWT over the last two dims (filters from pywavelets, one
    convolution per level on the tensor's device: :mod:`passes.transforms`); keeps the `keep`
    fraction of largest coefficients (about that fraction unless `exact`). Levels stop early once a
    side would drop below 2."""

    keep: float = 0.05
    wavelet: str = "db3"
    level: int = 3
    exact: bool = False
    name = "wavelet"

    def __post_init__(self) -> None:
        check_keep("WaveletCodec", self.keep)
        check_wavelet("WaveletCodec", self.wavelet)
        check.number("WaveletCodec", "level", self.level, lo=1, integer=True)
        check.flag("WaveletCodec", "exact", self.exact)

    def pack(self, x: Tensor) -> _SparsePacked:
        flat, layout = dwt_flat(as_planes(x).to(_work_dtype(x.dtype)), self.wavelet, self.level)
        return _sparse_pack(x, flat, self.keep, layout, self.exact)

    def unpack(self, p: _SparsePacked) -> Tensor:
        return _sparse_finish(dwt_flat_inverse(p.coeffs.dense(_work_dtype(p.dtype)), p.layout, self.wavelet,
                                               self.level), p)


# ---------------------------------------------------------------- linear quantization
@dataclass
class _QuantPacked:
    codes: Tensor   # int8 codes - 128 for bits=8; uint8, two 4-bit codes per byte, for bits=4
    low: Tensor     # float32 per-group value of the smallest code (0 for 4 bits, -128 for 8)
    scale: Tensor   # float32 per-group step
    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class QuantCodec:
    """Per-group linear quantization (groups of `group_size` consecutive values, min/max range,
    round to nearest or stochastic rounding as in ActNN) to `bits` = 8 or 4 bits."""

    bits: int = 8
    group_size: int = 256
    stochastic: bool = False

    def __post_init__(self) -> None:
        check.choice("QuantCodec", "bits", self.bits, (4, 8))
        check_group_size("QuantCodec", self.group_size)
        check.flag("QuantCodec", "stochastic", self.stochastic)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def pack(self, x: Tensor) -> _QuantPacked:
        flat = x.reshape(-1).float()
        pad = (-flat.numel()) % self.group_size
        g = (F.pad(flat, (0, pad)) if pad else flat).view(-1, self.group_size)
        low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)  # (two reductions beat aminmax on CPU)
        levels = 2 ** self.bits - 1
        scale = (high - low) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # codes = round((g - low) / scale) (or floor(... + u), u uniform, stochastic), in [0, levels],
        # shifted by -128 for 8 bits so that they cast to int8, whose cast from float is 3x faster
        # on CPU than uint8's: a broadcast multiply, in-place add and round, and the cast (a fused
        # addcmul over (groups, 1) operands is slower than the two)
        inv = 1.0 / scale
        offset = 128 if self.bits == 8 else 0
        q = g.mul(inv).add_(-offset - low * inv)
        if self.stochastic:
            q = q.add_(torch.rand_like(g)).floor_().clamp_(-offset, levels - offset)  # rounding may step past either end
        else:
            q = q.round_()  # in [-offset, levels - offset] up to rounding: the cast needs no clamp
        q = q.to(torch.int8)
        if self.bits == 4:
            q = q.view(torch.uint8)
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        return _QuantPacked(q, (low + offset * scale).squeeze(1), scale.squeeze(1), x.shape, x.dtype)

    def unpack(self, p: _QuantPacked) -> Tensor:
        q = p.codes
        if self.bits == 4:
            q = torch.stack([q & 15, q >> 4], 2).view(q.shape[0], -1)
        g = q.float().mul_(p.scale[:, None]).add_(p.low[:, None])  # in place: faster than one addcmul
        return g.view(-1)[:math.prod(p.shape)].to(p.dtype).view(p.shape)


METHODS = ("none", "random", "threshold", "dct", "wavelet", "int8", "int4")


def make_codec(method: str, keep: float = 0.05, block: int = 8, wavelet: str = "db3", level: int = 3,
               group_size: int = 256, stochastic: bool = False, exact: bool = False):
    """The codec for `method` (one of :data:`METHODS`) with its options."""
    if method == "none":
        return NoCodec()
    if method == "random":
        return RandomCodec()
    if method == "threshold":
        return ThresholdCodec(keep, exact)
    if method == "dct":
        return DCTCodec(keep, block, exact)
    if method == "wavelet":
        return WaveletCodec(keep, wavelet, level, exact)
    if method in ("int8", "int4"):
        return QuantCodec(int(method[3:]), group_size, stochastic)
    check.choice("CompressActivations", "method", method, METHODS)  # raises: no codec has that name
    raise AssertionError(method)  # METHODS and the branches above agree
