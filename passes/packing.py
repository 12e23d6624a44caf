"""Compact storage for what the activation codecs keep, on the tensor's own device: bit packing,
the kept values of a sparse vector with the smallest index (bitmask, chunk-local uint8 or int32
positions), and lossless packing of integer and bool tensors. Nothing is stored as int64.

Example::

    >>> import torch
    >>> s = keep_largest(torch.tensor([0.1, -3.0, 0.2, 2.0]), keep=0.5, store=torch.float32)
    >>> s.dense(torch.float32).tolist()
    [0.0, -3.0, 0.0, 2.0]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.errors import SurgeryError

__all__ = ["Sparse", "keep_largest", "index_bytes", "CHUNK", "IntegerCodec", "IntPacked", "pack_bits", "unpack_bits"]


# ---------------------------------------------------------------- sparse storage of kept values
CHUNK = 255
"""Positions per chunk of the chunk-local index: a position within a chunk and a chunk's count of
kept positions (at most 255) each fit one uint8 (a 256-position chunk would need int16 counts for
the full chunk, twice the count bytes, to gain one position per chunk)."""


def index_bytes(n: int, k: int) -> dict[str, int]:
    """Bytes of each way of storing k sorted positions among n, in the order that breaks ties: a
    bitmask (one bit per position), chunk-local (a uint8 position within its chunk of
    :data:`CHUNK` per kept value plus a uint8 count per chunk) and int32 positions."""
    return {"bitmask": (n + 7) // 8, "chunk": k + -(-n // CHUNK), "int32": 4 * k}


@dataclass
class Sparse:
    """The `keep` fraction of a flat vector with the largest magnitude: `values` in ascending
    position order plus their positions in the cheapest form of :func:`index_bytes`: `index` a
    uint8 bitmask (`counts` None), uint8 positions within chunks of :data:`CHUNK` with `counts`
    the uint8 number kept per chunk, or int32 positions (`counts` None). `index` is None when
    every value is kept."""

    values: Tensor
    index: Tensor | None
    numel: int
    counts: Tensor | None = None

    def _is_bitmask(self) -> bool:
        return self.index is not None and self.index.dtype == torch.uint8 and self.counts is None

    def positions(self) -> Tensor:
        """The kept positions, ascending (int64, transient: only during backward). No host sync,
        except for a bitmask (``nonzero``), which :meth:`dense` decodes without positions."""
        if self.index is None:
            return torch.arange(self.numel, device=self.values.device)
        if self._is_bitmask():
            return unpack_bits(self.index, self.numel).nonzero().squeeze(1)
        if self.counts is not None:
            chunk = torch.repeat_interleave(torch.arange(self.counts.numel(), device=self.index.device),
                                            self.counts.long(), output_size=self.values.numel())
            return chunk * CHUNK + self.index.long()
        return self.index.long()

    def dense(self, dtype: torch.dtype) -> Tensor:
        v = self.values.to(dtype)
        if self.index is None:
            return v
        out = torch.zeros(self.numel, dtype=dtype, device=v.device)
        if self._is_bitmask():
            out.masked_scatter_(unpack_bits(self.index, self.numel), v)
        else:
            out[self.positions()] = v
        return out


_BITS = {}


def _bit_weights(device: torch.device) -> Tensor:
    key = str(device)
    if key not in _BITS:
        _BITS[key] = (2 ** torch.arange(8, device=device)).to(torch.uint8)
    return _BITS[key]


def pack_bits(mask: Tensor) -> Tensor:
    pad = (-mask.numel()) % 8
    m = F.pad(mask.to(torch.uint8), (0, pad)).view(-1, 8)
    return (m * _bit_weights(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, numel: int) -> Tensor:
    return ((bits.unsqueeze(1) & _bit_weights(bits.device)) != 0).view(-1)[:numel]


def keep_largest(flat: Tensor, keep: float, store: torch.dtype, numel: int | None = None) -> Sparse:
    """Keep the ceil(keep * numel) entries of `flat` with the largest magnitude (every entry when
    keep >= 1). `numel` is the size of the tensor `flat` was computed from: a transform that pads
    has more coefficients than the tensor has values, and the budget follows the tensor. The index
    form is the smallest of :func:`index_bytes` (a choice made from n and k alone: no host sync)."""
    n = flat.numel()
    k = n if keep >= 1.0 else min(n, max(1, math.ceil(keep * (numel or n))))
    if k == n:
        return Sparse(flat.to(store).clone(), None, n)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    idx = torch.sort(idx).values  # position order: what the bitmask and chunk decodes need
    values = flat[idx].to(store)
    costs = index_bytes(n, k)
    kind = min(costs, key=costs.get)
    if kind == "bitmask":
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[idx] = True
        return Sparse(values, pack_bits(mask), n)
    if kind == "chunk":
        counts = torch.zeros(-(-n // CHUNK), dtype=torch.int32, device=flat.device)
        counts.index_add_(0, idx // CHUNK, torch.ones_like(idx, dtype=torch.int32))
        return Sparse(values, (idx % CHUNK).to(torch.uint8), n, counts.to(torch.uint8))
    return Sparse(values, idx.to(torch.int32), n)


# ---------------------------------------------------------------- lossless integer storage
_NARROW = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _narrowest(low: int, high: int) -> torch.dtype:
    """The narrowest of int8, uint8, int16, int32, int64 that holds every integer in [low, high]."""
    return next(d for d in _NARROW if torch.iinfo(d).min <= low and high <= torch.iinfo(d).max)


@dataclass
class IntPacked:
    """An integer tensor stored exactly: ``head`` None and ``body`` the values, or ``head`` the
    first value of each row along the last dim and ``body`` the differences of neighbours along
    it; each in the narrowest dtype that holds it. A bool tensor: ``body`` its bitmask."""

    head: Tensor | None
    body: Tensor
    shape: torch.Size
    dtype: torch.dtype


@dataclass(frozen=True)
class IntegerCodec:
    """Lossless storage for integer and bool tensors saved for backward (max-pool's int64 indices):
    the smallest of the values narrowed to the narrowest dtype that holds their range, or row-wise
    deltas along the last dim (first value of a row, then neighbour differences: max-pool indices
    step by about the stride) likewise narrowed. Bool tensors are bit-packed. Unpacking restores
    dtype, shape, values and device bit for bit.

    ``pack`` returns the tensor itself when no form is smaller (an empty tensor, a single bool, a
    wide-ranging int64 tensor) and for the unsigned dtypes torch has no min/max for (uint16 and
    wider), so the caller can keep it as it is and check its version. One host sync per integer
    tensor (none for bool): the storage dtype depends on the values.
    """

    name = "integer"

    def pack(self, x: Tensor) -> Tensor | IntPacked:
        if x.numel() == 0 or (x.dtype == torch.bool and x.numel() == 1):  # nothing narrower
            return x
        if x.dtype == torch.bool:
            return IntPacked(None, pack_bits(x.reshape(-1)), x.shape, x.dtype)
        if x.dtype not in _NARROW:
            if x.is_floating_point() or x.is_complex():
                raise SurgeryError(f"IntegerCodec: got a {x.dtype} tensor of shape {tuple(x.shape)}; "
                                   "it stores integer and bool tensors only")
            return x
        rows = x.reshape(-1, x.shape[-1] if x.dim() else 1).long()  # int64: no overflow for narrower types
        head, diff = rows[:, 0], rows[:, 1:] - rows[:, :-1]
        stats = [rows.amin(), rows.amax(), head.amin(), head.amax()]
        if diff.numel():
            stats += [diff.amin(), diff.amax()]
        low, high, *ranges = torch.stack(stats).tolist()
        as_is = x.numel() * x.element_size()
        raw = _narrowest(low, high)
        cost = {"raw": x.numel() * raw.itemsize}
        # deltas only where no difference can overflow int64 (else `diff` may have wrapped)
        if diff.numel() and high - low <= torch.iinfo(torch.int64).max:
            first, step = _narrowest(*ranges[:2]), _narrowest(*ranges[2:])
            cost["delta"] = head.numel() * first.itemsize + diff.numel() * step.itemsize
        best = min(cost, key=cost.get)
        if cost[best] >= as_is:
            return x
        if best == "raw":
            return IntPacked(None, rows.reshape(-1).to(raw), x.shape, x.dtype)  # narrower: a copy
        # copy=True: `head` is a view of x, and a narrowing might not be needed for it
        return IntPacked(head.to(first, copy=True), diff.to(step), x.shape, x.dtype)

    def unpack(self, p: Tensor | IntPacked) -> Tensor:
        if isinstance(p, Tensor):
            return p
        if p.dtype == torch.bool:
            return unpack_bits(p.body, math.prod(p.shape)).view(p.shape)
        values = p.body.long()
        if p.head is not None:  # the partial sums are the original values: no overflow
            values = torch.cat([p.head.long().unsqueeze(1), values], 1).cumsum(1)
        return values.to(p.dtype).view(p.shape)
