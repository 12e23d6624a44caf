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
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.errors import ConfigError

from . import _fields as check
from .packing import Sparse, keep_largest, pack_bits, unpack_bits

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
    low, has_zero = torch.stack([x.amin().float(), (x == 0).any().float()]).tolist()
    if low < 0 or not has_zero:
        return None
    return pack_bits((x != 0).reshape(-1))


def _sparse_pack(x: Tensor, coeffs: Tensor, keep: float, layout: tuple = ()) -> _SparsePacked:
    return _SparsePacked(keep_largest(coeffs, keep, x.dtype, x.numel()), x.shape, x.dtype, layout, _support(x))


def _sparse_finish(y: Tensor, p: _SparsePacked) -> Tensor:
    y = y.to(p.dtype).reshape(p.shape)
    if p.support is None:
        return y
    nonzero = unpack_bits(p.support, y.numel()).view(p.shape)
    # positives stay positive (at least the smallest normal), zeros stay exactly zero
    return torch.where(nonzero, y.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros((), dtype=y.dtype,
                                                                                      device=y.device))


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
    """Keeps the `keep` fraction of values with the largest magnitude, zero elsewhere."""

    keep: float = 0.05
    name = "threshold"

    def __post_init__(self) -> None:
        check_keep("ThresholdCodec", self.keep)

    def pack(self, x: Tensor) -> _SparsePacked:
        return _sparse_pack(x, x.reshape(-1), self.keep)

    def unpack(self, p: _SparsePacked) -> Tensor:
        return _sparse_finish(p.coeffs.dense(p.dtype), p)


def _as_planes(x: Tensor) -> Tensor:
    """(..., H, W) -> (M, H, W); a 0-d or 1-d tensor becomes a single row."""
    if x.dim() < 2:
        return x.reshape(1, 1, -1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


@lru_cache(maxsize=64)
def _dct_matrix(b: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    n = torch.arange(b, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * b)) * math.sqrt(2.0 / b)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class DCTCodec:
    """Orthonormal 2-D DCT-II over the last two dims (H x W) in `block` x `block` tiles (a side
    shorter than `block` is one tile; other sides are zero padded to a multiple of the block);
    keeps the ceil(keep * numel) largest coefficients."""

    keep: float = 0.05
    block: int = 8
    name = "dct"

    def __post_init__(self) -> None:
        check_keep("DCTCodec", self.keep)
        check.number("DCTCodec", "block", self.block, lo=1, integer=True)

    def pack(self, x: Tensor) -> _SparsePacked:
        planes = _as_planes(x).to(_work_dtype(x.dtype))
        m, h, w = planes.shape
        bh, bw = min(self.block, h), min(self.block, w)  # a 4x4 map gets 4x4 tiles, not padding
        hb, wb = -(-h // bh), -(-w // bw)
        planes = F.pad(planes, (0, wb * bw - w, 0, hb * bh - h)).view(m, hb, bh, wb, bw)
        dh, dw = _dct_matrix(bh, x.device, planes.dtype), _dct_matrix(bw, x.device, planes.dtype)
        coeffs = torch.einsum("ij,mhjwk,lk->mhiwl", dh, planes, dw)
        return _sparse_pack(x, coeffs.reshape(-1), self.keep, (m, h, w, bh, bw))

    def unpack(self, p: _SparsePacked) -> Tensor:
        m, h, w, bh, bw = p.layout
        hb, wb = -(-h // bh), -(-w // bw)
        coeffs = p.coeffs.dense(_work_dtype(p.dtype)).view(m, hb, bh, wb, bw)
        dh, dw = _dct_matrix(bh, coeffs.device, coeffs.dtype), _dct_matrix(bw, coeffs.device, coeffs.dtype)
        planes = torch.einsum("ij,mhiwl,lk->mhjwk", dh, coeffs, dw).reshape(m, hb * bh, wb * bw)
        return _sparse_finish(planes[:, :h, :w], p)


# ---------------------------------------------------------------- wavelet transform
_WAVELETS = "expected the name of an orthogonal pywavelets wavelet (haar, db*, sym*, coif*)"


@lru_cache(maxsize=64)
def _filter_bank(wavelet: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    w = _orthogonal_wavelet("WaveletCodec", wavelet)
    # conv1d correlates: reversing the decomposition filters makes it the convolution pywt uses
    bank = torch.tensor([w.dec_lo[::-1], w.dec_hi[::-1]], dtype=torch.float64)
    return bank.unsqueeze(1).to(device=device, dtype=dtype)  # (2, 1, L)


def _orthogonal_wavelet(owner: str, wavelet: Any) -> Any:
    import pywt  # a declared dependency; imported here so the module loads without it
    if not isinstance(wavelet, str):
        raise ConfigError(owner, "wavelet", wavelet, _WAVELETS)
    try:
        w = pywt.Wavelet(wavelet)
    except (ValueError, TypeError) as e:
        raise ConfigError(owner, "wavelet", wavelet, f"{_WAVELETS}; pywt: {e}") from None
    if not w.orthogonal:
        raise ConfigError(owner, "wavelet", wavelet, f"{_WAVELETS}; {wavelet!r} is not orthogonal: the periodized "
                                                     "transform is inverted by its transpose")
    return w


def check_wavelet(owner: str, wavelet: Any) -> None:
    """ConfigError unless `wavelet` names an orthogonal pywavelets wavelet."""
    _orthogonal_wavelet(owner, wavelet)


def _wrap_index(n: int, length: int, device: torch.device) -> Tensor:
    # periodization: padded[i] = x[(i - (length - n)) mod n]
    return (torch.arange(length, device=device) - (length - n)) % n


def _analysis(x: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
    """One periodized DWT level along the last dim of (R, n): (lo, hi), each (R, ceil(n/2)).
    An odd n is zero padded by one; the periodized orthogonal transform is then orthogonal."""
    if x.shape[1] % 2:
        x = F.pad(x, (0, 1))
    n, taps = x.shape[1], bank.shape[-1]
    padded = x[:, _wrap_index(n, n + taps - 2, x.device)]
    out = F.conv1d(padded.unsqueeze(1), bank, stride=2)
    return out[:, 0], out[:, 1]


def _synthesis(lo: Tensor, hi: Tensor, n: int, bank: Tensor) -> Tensor:
    """The transpose (= inverse) of :func:`_analysis`, cropped back to length n."""
    half = lo.shape[1]
    taps = bank.shape[-1]
    padded = F.conv_transpose1d(torch.stack([lo, hi], 1), bank, stride=2).squeeze(1)
    out = torch.zeros(lo.shape[0], 2 * half, dtype=lo.dtype, device=lo.device)
    out.index_add_(1, _wrap_index(2 * half, 2 * half + taps - 2, lo.device), padded)
    return out[:, :n]


def _dwt2(x: Tensor, bank: Tensor) -> tuple[Tensor, list[Tensor]]:
    """One 2-D level of (M, h, w): LL and the three detail bands (LH, HL, HH)."""
    m, h, w = x.shape
    lo, hi = _analysis(x.reshape(m * h, w), bank)
    w2 = lo.shape[1]
    rows = torch.cat([lo, hi], 1).view(m, h, 2 * w2).transpose(1, 2).reshape(m * 2 * w2, h)
    lo, hi = _analysis(rows, bank)
    h2 = lo.shape[1]
    full = torch.cat([lo, hi], 1).view(m, 2 * w2, 2 * h2).transpose(1, 2)  # (m, 2h2, 2w2)
    return (full[:, :h2, :w2].contiguous(),
            [full[:, :h2, w2:], full[:, h2:, :w2], full[:, h2:, w2:]])


def _idwt2(ll: Tensor, details: list[Tensor], h: int, w: int, bank: Tensor) -> Tensor:
    m, h2, w2 = ll.shape
    full = torch.cat([torch.cat([ll, details[0]], 2), torch.cat([details[1], details[2]], 2)], 1)
    cols = full.transpose(1, 2).reshape(m * 2 * w2, 2 * h2)
    rows = _synthesis(cols[:, :h2], cols[:, h2:], h, bank).view(m, 2 * w2, h).transpose(1, 2)
    rows = rows.reshape(m * h, 2 * w2)
    return _synthesis(rows[:, :w2], rows[:, w2:], w, bank).view(m, h, w)


@dataclass(frozen=True)
class WaveletCodec:
    """Multi-level 2-D periodized DWT over the last two dims (filters from pywavelets, computed
    with torch convolutions on the tensor's device); keeps the `keep` fraction of largest
    coefficients. Levels stop early once a side would drop below 2."""

    keep: float = 0.05
    wavelet: str = "db3"
    level: int = 3
    name = "wavelet"

    def __post_init__(self) -> None:
        check_keep("WaveletCodec", self.keep)
        check_wavelet("WaveletCodec", self.wavelet)
        check.number("WaveletCodec", "level", self.level, lo=1, integer=True)

    def pack(self, x: Tensor) -> _SparsePacked:
        ll = _as_planes(x).to(_work_dtype(x.dtype))
        bank = _filter_bank(self.wavelet, x.device, ll.dtype)
        sizes, bands = [], []
        for _ in range(self.level):
            if min(ll.shape[1], ll.shape[2]) < 2:
                break
            sizes.append((ll.shape[1], ll.shape[2]))
            ll, details = _dwt2(ll, bank)
            bands += details
        flat = torch.cat([ll.reshape(-1)] + [d.reshape(-1) for d in bands])
        layout = (tuple(ll.shape), tuple(sizes), tuple(tuple(d.shape) for d in bands))
        return _sparse_pack(x, flat, self.keep, layout)

    def unpack(self, p: _SparsePacked) -> Tensor:
        ll_shape, sizes, band_shapes = p.layout
        flat = p.coeffs.dense(_work_dtype(p.dtype))
        bank = _filter_bank(self.wavelet, flat.device, flat.dtype)
        parts = flat.split([math.prod(s) for s in (ll_shape, *band_shapes)])
        ll = parts[0].view(ll_shape)
        bands = [t.view(s) for t, s in zip(parts[1:], band_shapes)]
        for i in reversed(range(len(sizes))):
            ll = _idwt2(ll, bands[3 * i:3 * i + 3], *sizes[i], bank)
        return _sparse_finish(ll, p)


# ---------------------------------------------------------------- linear quantization
@dataclass
class _QuantPacked:
    codes: Tensor   # uint8; two 4-bit codes per byte for bits=4
    low: Tensor     # float32 per-group minimum
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
        g = F.pad(flat, (0, (-flat.numel()) % self.group_size)).view(-1, self.group_size)
        low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        levels = 2 ** self.bits - 1
        scale = (high - low) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (g - low) / scale
        q = torch.floor(q + torch.rand_like(q)) if self.stochastic else torch.round(q)
        q = q.clamp_(0, levels).to(torch.uint8)
        if self.bits == 4:
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        return _QuantPacked(q, low.squeeze(1), scale.squeeze(1), x.shape, x.dtype)

    def unpack(self, p: _QuantPacked) -> Tensor:
        q = p.codes
        if self.bits == 4:
            q = torch.stack([q & 15, q >> 4], 2).view(q.shape[0], -1)
        g = q.float() * p.scale[:, None] + p.low[:, None]
        return g.view(-1)[:math.prod(p.shape)].to(p.dtype).view(p.shape)


METHODS = ("none", "random", "threshold", "dct", "wavelet", "int8", "int4")


def make_codec(method: str, keep: float = 0.05, block: int = 8, wavelet: str = "db3", level: int = 3,
               group_size: int = 256, stochastic: bool = False):
    """The codec for `method` (one of :data:`METHODS`) with its options."""
    if method == "none":
        return NoCodec()
    if method == "random":
        return RandomCodec()
    if method == "threshold":
        return ThresholdCodec(keep)
    if method == "dct":
        return DCTCodec(keep, block)
    if method == "wavelet":
        return WaveletCodec(keep, wavelet, level)
    if method in ("int8", "int4"):
        return QuantCodec(int(method[3:]), group_size, stochastic)
    check.choice("CompressActivations", "method", method, METHODS)  # raises: no codec has that name
    raise AssertionError(method)  # METHODS and the branches above agree
