"""The orthogonal transforms behind the dct and wavelet codecs, each a few large tensor ops on the
tensor's own device: no Python loop over planes, tiles or channels.

Both are separable (a 1-D transform along H, one along W) and run as matrix products over all
planes at once:

- Tiled DCT-II: each side cut into tiles of `block` (a side shorter than `block` is one tile;
  other sides are zero padded to a multiple of it), and the b x b DCT matrix applied along each
  side of every tile: 2b multiply-adds per value, whatever the plane's size. Small and narrow
  planes, where batches of tiny products run far from the machine's speed, take larger matrices
  instead (:data:`SMALL`, :data:`SIDE`).
- Periodized 2-D DWT (Mallat): per level, the level matrix of each side (its rows the shifted low-
  and high-pass filters) gives the four bands (LL | LH over HL | HH); the next level transforms LL.
  An odd side is zero padded by one; a side over :data:`TILE` is cut into tiles of it first. A
  dense level matrix does H + W multiply-adds per value where a strided convolution would do 2L
  (12 for db3), but a matrix product runs near the machine's peak and a one-channel convolution
  far from it: 2.6 ms against 12 ms on 2048 planes of 28 x 28 on one CPU thread, and at 112 x 112
  still 6.4 against 10.

Both are orthonormal, so the inverse (the transposed matrices) is exact to float rounding and the
energy a codec drops is the energy of the coefficients it drops.

Example::

    >>> import torch
    >>> x = torch.randn(3, 10, 12)
    >>> bool(torch.allclose(dwt_inverse(*dwt(x, "db3", 3), "db3"), x, atol=1e-5))
    True
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.errors import ConfigError

__all__ = ["as_planes", "tiled_dct", "tiled_dct_inverse", "dwt", "dwt_inverse", "dwt_flat", "dwt_flat_inverse",
           "check_wavelet", "SMALL"]


def as_planes(x: Tensor) -> Tensor:
    """(..., H, W) -> (M, H, W); a 0-d or 1-d tensor becomes a single row."""
    if x.dim() < 2:
        return x.reshape(1, 1, -1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


Pair = tuple[Tensor, Tensor]
"""A matrix and its transpose, both contiguous: a batched product with a transposed view takes a
slow path (4.3 ms against 1.2 for 2048 planes of 28 x 28)."""


def _pair(matrix: Tensor, device: torch.device, dtype: torch.dtype) -> Pair:
    m = matrix.to(device=device, dtype=dtype)
    return m.contiguous(), m.T.contiguous()


def _apply(planes: Tensor, rows: Pair, cols: Pair) -> Tensor:
    """rows @ planes @ cols^T for every plane of (M, h, w): (M, rows' rows, cols' rows)."""
    return torch.matmul(rows[0], planes @ cols[1])


def _apply_inverse(coeffs: Tensor, rows: Pair, cols: Pair) -> Tensor:
    """rows^T @ coeffs @ cols for every plane: the inverse of :func:`_apply` for orthonormal rows
    and cols (cropped: a padded side's extra rows fall away)."""
    return torch.matmul(rows[1], coeffs @ cols[0])


SMALL = 256
"""A plane of at most this many values (16 x 16) is transformed by one matrix over the whole plane
(the DCT of a plane that is one tile; every level of the DWT), in one product for all planes:
(M, h*w) @ (h*w, coefficients). A ResNet's late stages have 7 x 7 and 4 x 4 planes, whose batched
products of tiny matrices run 15-25x slower on a CPU (8192 planes of 7 x 7: 6.9 ms against 0.43)."""


def _padded(planes: Tensor, th: int, tw: int) -> tuple[Tensor, int, int]:
    """`planes` (M, H, W) zero padded to whole tiles of th x tw: (padded, tiles down, tiles across)."""
    h, w = planes.shape[-2:]
    hb, wb = -(-h // th), -(-w // tw)
    if hb * th != h or wb * tw != w:
        planes = F.pad(planes, (0, wb * tw - w, 0, hb * th - h))
    return planes, hb, wb


# ---------------------------------------------------------------- tiled DCT
@lru_cache(maxsize=64)
def _dct_matrix(b: int) -> Tensor:
    """The orthonormal DCT-II matrix of size b (float64, CPU)."""
    n = torch.arange(b, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * b)) * math.sqrt(2.0 / b)
    d[0] /= math.sqrt(2.0)
    return d


@lru_cache(maxsize=64)
def _dct(b: int, device: torch.device, dtype: torch.dtype) -> Pair:
    return _pair(_dct_matrix(b), device, dtype)


@lru_cache(maxsize=64)
def _dct_whole(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Pair:
    """The DCT of one h x w tile as an (h*w, h*w) matrix acting on row-major flattened planes (the
    Kronecker product of the sides' DCT matrices, transposed), and its inverse."""
    return _pair(torch.kron(_dct_matrix(h), _dct_matrix(w)).T, device, dtype)


SIDE = 32
"""Planes no wider or taller than this are tiled-DCT transformed by each side's whole block-diagonal
matrix (zero padding built in): side-many multiply-adds per value instead of 2 x block, but two
large products instead of batches of block x block ones: 2048 planes of 28 x 28, forward and
inverse, 5.1 ms against 8.5 on one CPU thread (at 56 x 56 the tile products win)."""


@lru_cache(maxsize=64)
def _dct_side(n: int, b: int, device: torch.device, dtype: torch.dtype) -> Pair:
    """The tiled DCT of a side of n in tiles of b (the last one zero padded) as one (ceil(n/b)*b, n)
    matrix: b x b DCT blocks on the diagonal, the padded columns dropped."""
    return _pair(torch.block_diag(*[_dct_matrix(b)] * -(-n // b))[:, :n], device, dtype)


def tiled_dct(planes: Tensor, block: int) -> tuple[Tensor, tuple]:
    """The 2-D DCT of (M, H, W) `planes` in `block` x `block` tiles (a side shorter than `block`
    is one tile; other sides are zero padded to a multiple of it): (coefficients, the layout
    :func:`tiled_dct_inverse` needs). Two products with the b x b DCT matrix, one along each side
    of every tile: 2b multiply-adds per value, whatever the plane's width; a plane that is one
    tile of at most :data:`SMALL` values takes one product with its Kronecker matrix, a plane no
    wider than :data:`SIDE` one with each side's block-diagonal matrix (the same coefficients)."""
    m, h, w = planes.shape
    bh, bw = min(block, h), min(block, w)
    if bh == h and bw == w and h * w <= SMALL:  # one tile: one product with the whole-plane matrix
        return (planes.reshape(m, h * w) @ _dct_whole(h, w, planes.device, planes.dtype)[0]).view(m, h, w), \
            (m, h, w, bh, bw)
    if max(h, w) <= SIDE:  # narrow planes: a product with each side's block-diagonal matrix
        rows = (planes.reshape(m * h, w) @ _dct_side(w, bw, planes.device, planes.dtype)[1]).view(m, h, -1)
        return torch.matmul(_dct_side(h, bh, planes.device, planes.dtype)[0], rows), (m, h, w, bh, bw)
    planes, hb, wb = _padded(planes, bh, bw)
    rows = (planes.reshape(-1, bw) @ _dct(bw, planes.device, planes.dtype)[1]).view(m * hb, bh, wb * bw)
    coeffs = torch.matmul(_dct(bh, planes.device, planes.dtype)[0], rows).view(m, hb * bh, wb * bw)
    return coeffs, (m, h, w, bh, bw)


def tiled_dct_inverse(coeffs: Tensor, layout: tuple) -> Tensor:
    """The (M, H, W) planes whose :func:`tiled_dct` is `coeffs` (any shape holding its values)."""
    m, h, w, bh, bw = layout
    if bh == h and bw == w and h * w <= SMALL:
        return (coeffs.reshape(m, h * w) @ _dct_whole(h, w, coeffs.device, coeffs.dtype)[1]).view(m, h, w)
    hb, wb = -(-h // bh), -(-w // bw)
    if max(h, w) <= SIDE:
        rows = torch.matmul(_dct_side(h, bh, coeffs.device, coeffs.dtype)[1], coeffs.reshape(m, hb * bh, wb * bw))
        return (rows.reshape(m * h, wb * bw) @ _dct_side(w, bw, coeffs.device, coeffs.dtype)[0]).view(m, h, w)
    rows = torch.matmul(_dct(bh, coeffs.device, coeffs.dtype)[1], coeffs.reshape(m * hb, bh, wb * bw))
    planes = (rows.reshape(-1, bw) @ _dct(bw, coeffs.device, coeffs.dtype)[0]).view(m, hb * bh, wb * bw)
    return planes[:, :h, :w]


# ---------------------------------------------------------------- periodized DWT
_WAVELETS = "expected the name of an orthogonal pywavelets wavelet (haar, db*, sym*, coif*)"


def _orthogonal_wavelet(owner: str, wavelet: Any) -> Any:
    import pywt  # a declared dependency; imported here so the module loads without it
    if not isinstance(wavelet, str):
        raise ConfigError(owner, "wavelet", wavelet, _WAVELETS)
    try:
        w = pywt.Wavelet(wavelet)
    except (ValueError, TypeError) as e:
        raise ConfigError(owner, "wavelet", wavelet, f"{_WAVELETS}; pywt: {e}") from None
    if not w.orthogonal or len(w.dec_lo) % 2:
        raise ConfigError(owner, "wavelet", wavelet, f"{_WAVELETS}; {wavelet!r} is not orthogonal: the periodized "
                                                     "transform is inverted by its transpose")
    return w


def check_wavelet(owner: str, wavelet: Any) -> None:
    """ConfigError unless `wavelet` names an orthogonal pywavelets wavelet."""
    _orthogonal_wavelet(owner, wavelet)


@lru_cache(maxsize=128)
def _level(n: int, wavelet: str, device: torch.device, dtype: torch.dtype) -> Pair:
    """One periodized DWT level of a side of n as a matrix (n + n % 2, n): the first half of its
    rows the low-pass outputs, the second half the high-pass ones, out_c[k] =
    sum_j h_c[j] x[(2k + j - (L - 2)) mod n'] over the side zero padded to even n' (whose
    columns past n are dropped)."""
    w = _orthogonal_wavelet("WaveletCodec", wavelet)
    # conv correlates: reversing the decomposition filters gives the convolution pywt computes
    bank = torch.tensor([w.dec_lo[::-1], w.dec_hi[::-1]], dtype=torch.float64)  # (2, L)
    even, taps = n + n % 2, bank.shape[1]
    k, j = torch.meshgrid(torch.arange(even // 2), torch.arange(taps), indexing="ij")
    matrix = torch.zeros(2, even // 2, even, dtype=torch.float64)
    for c in range(2):  # the two filters (a wrap-around adds up taps that land on one column)
        matrix[c].index_put_((k, (2 * k + j - (taps - 2)) % even), bank[c].expand_as(k), accumulate=True)
    return _pair(matrix.reshape(even, even)[:, :n], device, dtype)


TILE = 128
"""Sides longer than this are cut into tiles of it (zero padded) before the DWT: a level matrix
costs its side in multiply-adds per value, and a ViT's (tokens, 3072) plane would pay 3072."""


def _tile(planes: Tensor) -> tuple[Tensor, tuple]:
    """(M, H, W) -> (M * hb * wb, th, tw) tiles of at most TILE x TILE, and what undoes it."""
    m, h, w = planes.shape
    th, tw = min(h, TILE), min(w, TILE)
    planes, hb, wb = _padded(planes, th, tw)
    if hb == wb == 1:
        return planes, (m, h, w, th, tw)
    return planes.reshape(m, hb, th, wb, tw).transpose(2, 3).reshape(-1, th, tw), (m, h, w, th, tw)


def _untile(tiles: Tensor, tiling: tuple) -> Tensor:
    m, h, w, th, tw = tiling
    hb, wb = -(-h // th), -(-w // tw)
    if hb == wb == 1:
        return tiles
    return tiles.reshape(m, hb, wb, th, tw).transpose(2, 3).reshape(m, hb * th, wb * tw)[:, :h, :w]


def dwt(planes: Tensor, wavelet: str, level: int) -> tuple[Tensor, list[Tensor], tuple]:
    """Up to `level` levels of the periodized 2-D DWT of (M, H, W) `planes`, in tiles of at most
    :data:`TILE` a side (a level stops once a side would drop below 2): (the last LL band, the
    three detail bands of each level as one (M', 3, h_i, w_i) tensor, the layout
    :func:`dwt_inverse` needs)."""
    ll, tiling = _tile(planes)
    details, sizes = [], []
    for h, w, hp, wp in _level_shapes(*ll.shape[-2:], level):
        sizes.append((h, w))
        y = _apply(ll, _level(h, wavelet, ll.device, ll.dtype), _level(w, wavelet, ll.device, ll.dtype))
        h2, w2 = hp // 2, wp // 2
        details.append(torch.stack([y[:, :h2, w2:], y[:, h2:, :w2], y[:, h2:, w2:]], 1))
        ll = y[:, :h2, :w2]
    return ll, details, (tiling, tuple(sizes))


def dwt_inverse(ll: Tensor, details: list[Tensor], layout: tuple, wavelet: str) -> Tensor:
    """The (M, H, W) planes whose :func:`dwt` is (`ll`, `details`, `layout`)."""
    tiling, sizes = layout
    for bands, (h, w) in zip(reversed(details), reversed(sizes)):
        y = torch.cat([torch.cat([ll, bands[:, 0]], 2), torch.cat([bands[:, 1], bands[:, 2]], 2)], 1)
        ll = _apply_inverse(y, _level(h, wavelet, ll.device, ll.dtype), _level(w, wavelet, ll.device, ll.dtype))
    return _untile(ll, tiling)


@lru_cache(maxsize=128)
def _dwt_whole(h: int, w: int, wavelet: str, level: int, device: torch.device, dtype: torch.dtype) -> Pair:
    """:func:`dwt` of an h x w plane as an (h*w, coefficients) matrix (row i: the coefficients of
    the i-th basis plane, flattened as :func:`dwt_flat` orders them), and its transpose, the inverse
    (orthonormal on the zero-padded plane)."""
    n = h * w
    ll, details, _ = dwt(torch.eye(n, dtype=torch.float64).view(n, h, w), wavelet, level)
    return _pair(torch.cat([ll.reshape(n, -1)] + [d.reshape(n, -1) for d in details], 1), device, dtype)


def _level_shapes(h: int, w: int, level: int) -> list[tuple[int, int, int, int]]:
    """(h, w, h', w') per level of :func:`dwt` on an h x w plane: in, and out (sides made even)."""
    shapes = []
    for _ in range(level):
        if min(h, w) < 2:
            break
        shapes.append((h, w, h + h % 2, w + w % 2))
        h, w = (h + h % 2) // 2, (w + w % 2) // 2
    return shapes


def dwt_flat(planes: Tensor, wavelet: str, level: int) -> tuple[Tensor, tuple]:
    """:func:`dwt`'s coefficients of (M, H, W) `planes` as one flat vector, and the layout
    :func:`dwt_flat_inverse` needs. Planes of at most :data:`SMALL` values take one product with
    the whole-plane matrix (every level at once). Larger ones keep each level's whole output in
    the vector, written there by its product, with the LL quadrant that the next level transforms
    set to zero (a third more entries, all zero, where gathering the three detail bands and
    scattering them back cost copies with rows as short as the bands')."""
    m, h, w = planes.shape
    if h * w <= SMALL:
        whole = _dwt_whole(h, w, wavelet, level, planes.device, planes.dtype)[0]
        return (planes.reshape(m, h * w) @ whole).reshape(-1), ("whole", m, h, w)
    ll, tiling = _tile(planes)
    shapes = _level_shapes(*ll.shape[-2:], level)
    if not shapes:
        return ll.reshape(-1).clone(), ("levels", tiling, ll.shape[0], ())
    n = ll.shape[0]
    flat = ll.new_empty(sum(n * hp * wp for _, _, hp, wp in shapes))
    offset = 0
    for i, (h, w, hp, wp) in enumerate(shapes):
        rows, cols = _level(h, wavelet, ll.device, ll.dtype), _level(w, wavelet, ll.device, ll.dtype)
        y = flat[offset:offset + n * hp * wp].view(n, hp, wp)
        torch.matmul(rows[0], ll @ cols[1], out=y)
        offset += n * hp * wp
        if i + 1 < len(shapes):
            ll = y[:, :hp // 2, :wp // 2].clone()
            y[:, :hp // 2, :wp // 2] = 0
    return flat, ("levels", tiling, n, tuple(shapes))


def dwt_flat_inverse(flat: Tensor, layout: tuple, wavelet: str, level: int) -> Tensor:
    """The (M, H, W) planes whose :func:`dwt_flat` is (`flat`, `layout`); `flat` is written into
    (the LL quadrants' zeros)."""
    if layout[0] == "whole":
        _, m, h, w = layout
        return (flat.reshape(m, -1) @ _dwt_whole(h, w, wavelet, level, flat.device, flat.dtype)[1]).view(m, h, w)
    _, tiling, n, shapes = layout
    if not shapes:
        return _untile(flat.view(n, *tiling[3:]), tiling)
    ends = list(itertools.accumulate(n * hp * wp for _, _, hp, wp in shapes))
    ll = None
    for (h, w, hp, wp), end in zip(reversed(shapes), reversed(ends)):
        y = flat[end - n * hp * wp:end].view(n, hp, wp)
        if ll is not None:
            y[:, :hp // 2, :wp // 2] = ll
        ll = _apply_inverse(y, _level(h, wavelet, flat.device, flat.dtype), _level(w, wavelet, flat.device, flat.dtype))
    return _untile(ll, tiling)
