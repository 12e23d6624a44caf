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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.errors import SurgeryError

__all__ = ["Sparse", "keep_largest", "index_bytes", "CHUNK", "IntegerCodec", "IntPacked", "pack_bits", "unpack_bits",
           "bits_as", "zero_outside_", "SAMPLE"]


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
"""The float dtypes numpy has (not bfloat16)."""


def _numpy(t: Tensor) -> bool:
    """Whether numpy does this module's selection, bit and index work on `t`'s values: on the CPU,
    where its ops run at 1.5-10x ATen's on one thread (op by op, figures where each is used)."""
    return t.device.type == "cpu"


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
            if _numpy(self.index):  # numpy's repeat: 3x ATen's repeat_interleave here
                return torch.from_numpy(np.repeat(np.arange(0, self.counts.numel() * CHUNK, CHUNK),
                                                  self.counts.numpy()) + self.index.numpy())
            chunk = torch.repeat_interleave(torch.arange(self.counts.numel(), device=self.index.device),
                                            self.counts.long(), output_size=self.values.numel())
            return chunk * CHUNK + self.index.long()
        return self.index.long()

    def dense(self, dtype: torch.dtype, base: Tensor | None = None) -> Tensor:
        """The flat vector: the kept values at their positions and zero elsewhere, or, given
        `base` (a fresh flat tensor of `dtype`), the kept values written into it."""
        if self.index is None:
            return self.values.to(dtype, copy=True)  # a fresh tensor, which callers may edit in place
        v = self.values.to(dtype)
        if _numpy(v) and dtype in _NUMPY_FLOATS:  # numpy's zeros and indexed store: 2x ATen's
            out = torch.from_numpy(np.zeros(self.numel, _NUMPY_FLOATS[dtype])) if base is None else base
            where = unpack_bits(self.index, self.numel) if self._is_bitmask() else self.positions()
            out.numpy()[where.numpy()] = v.numpy()
            return out
        out = torch.zeros(self.numel, dtype=dtype, device=v.device) if base is None else base
        if self._is_bitmask():
            out.masked_scatter_(unpack_bits(self.index, self.numel), v)
        else:
            out[self.positions()] = v
        return out


_GATHER = 0x0102040810204080
"""Times an int64 holding eight 0/1 bytes b0..b7 (little-endian), its top byte is b0 + 2 b1 + ... + 128 b7."""


def pack_bits(mask: Tensor) -> Tensor:
    """One bit per entry of `mask` (flattened), least significant bit first (numpy's
    ``packbits(bitorder="little")``, which does it on the CPU; elsewhere eight bool bytes are read
    as one int64 and gathered into a byte by a multiplication: no per-bit pass)."""
    m = mask.reshape(-1).contiguous()
    if _numpy(m):  # numpy's packbits: 3x the multiply below there
        return torch.from_numpy(np.packbits((m if m.dtype == torch.bool else m != 0).numpy(), bitorder="little"))
    m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    pad = (-m.numel()) % 8
    if pad or m.storage_offset() % 8:
        m = F.pad(m, (0, pad))  # a fresh, aligned tensor
    return ((m.view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


_TABLES: dict[tuple, Tensor] = {}


def bits_as(bits: Tensor, numel: int, value: float, dtype: torch.dtype) -> Tensor:
    """A fresh flat `dtype` tensor of length `numel`: `value` where :func:`pack_bits` packed a 1,
    zero elsewhere (numpy's ``unpackbits`` on the CPU; elsewhere one row of a 256 x 8 table per byte)."""
    if _numpy(bits) and (dtype == torch.bool or dtype in _NUMPY_FLOATS):  # numpy: 1.5x, bool 7x
        ones = np.unpackbits(bits.numpy(), count=numel, bitorder="little")
        if dtype == torch.bool:
            return torch.from_numpy(ones.view(np.bool_))
        np_dtype = _NUMPY_FLOATS[dtype]
        return torch.from_numpy(np.multiply(ones, np_dtype(value), dtype=np_dtype))
    key = (str(bits.device), dtype, value)
    if key not in _TABLES:
        table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float64) * value
        _TABLES[key] = table.to(device=bits.device, dtype=dtype)
    out = _TABLES[key].index_select(0, bits.long()).view(-1)
    return out if out.numel() == numel else out[:numel].clone()


def zero_outside_(y: Tensor, bits: Tensor) -> Tensor:
    """`y` with every entry whose :func:`pack_bits` bit (of y flattened) is 0 set to zero, in place."""
    if _numpy(y) and y.dtype in _NUMPY_FLOATS and y.is_contiguous():  # one numpy pass: 3x
        a = y.view(-1).numpy()
        np.multiply(a, np.unpackbits(bits.numpy(), count=y.numel(), bitorder="little"), out=a)
        return y
    return y.mul_(bits_as(bits, y.numel(), 1.0, y.dtype).view(y.shape))


def unpack_bits(bits: Tensor, numel: int) -> Tensor:
    """The bool vector of length `numel` that :func:`pack_bits` packed."""
    return bits_as(bits, numel, 1.0, torch.bool)


SAMPLE = 4096
"""The approximate threshold of :func:`keep_largest` is the (keep * size)-th largest magnitude of a
sample holding about this many values above it: a relative standard error of about
1/sqrt(SAMPLE) = 1.6% on the number kept, and within 10% of it at six standard errors."""

_PHI = (math.sqrt(5) - 1) / 2
_POSITIONS: dict[tuple, Tensor] = {}  # (n, m, device) -> the m sample positions among n


def _sample_positions(n: int, m: int, device: torch.device) -> Tensor:
    """m positions spread over [0, n): frac(i * golden ratio) * n, a low-discrepancy sequence that
    no period of a feature map (channel, row, column) lines up with; deterministic."""
    key = (n, m, str(device))
    positions = _POSITIONS.get(key)
    if positions is None:
        if len(_POSITIONS) >= 256:  # a model saves tensors of a few dozen sizes
            _POSITIONS.clear()
        fractions = torch.arange(m, dtype=torch.float64) * _PHI % 1.0
        positions = _POSITIONS[key] = (fractions * n).long().to(device)
    return positions


def _threshold(a: Tensor, k: int) -> Tensor:
    """A magnitude about k of the entries of `a` (magnitudes, flat) reach: the k-th largest of a
    sample (exact when the sample would be the whole tensor), never below the smallest positive
    normal, so that zeros (a ReLU's) are never kept."""
    n = a.numel()
    m = math.ceil(SAMPLE * n / k)
    if m >= n:
        t = _kth_largest(a, k)
    else:
        t = _kth_largest(a.index_select(0, _sample_positions(n, m, a.device)), max(1, round(k * m / n)))
    return t.clamp_min(torch.finfo(a.dtype).tiny)


def _kth_largest(s: Tensor, j: int) -> Tensor:
    """The j-th largest entry of flat `s`, a 0-d tensor. On the CPU numpy's introselect
    (``np.partition``) finds it at ten times the speed of ``torch.topk`` (82k values: 0.1 ms)."""
    if _numpy(s) and s.dtype in _NUMPY_FLOATS:
        i = s.numel() - j
        return torch.from_numpy(np.partition(s.detach().numpy(), i)[i:i + 1]).reshape(())
    return torch.topk(s, j, sorted=False).values.min()


def at_least(a: Tensor, t: Tensor) -> Tensor:
    """The ascending positions (int64) of the entries of flat `a` that are >= the 0-d `t`. On the
    CPU numpy does it: its compare and flatnonzero run 4x and 2x as fast as ATen's there (1.6M
    floats, one thread: 2.1 ms against 4.7)."""
    if _numpy(a) and a.dtype in _NUMPY_FLOATS:
        return torch.from_numpy(np.flatnonzero(a.detach().numpy() >= t.item()))
    return (a >= t).nonzero().squeeze(1)


def keep_largest(flat: Tensor, keep: float, store: torch.dtype, numel: int | None = None,
                 exact: bool = False, nonnegative: bool = False) -> Sparse:
    """Keep about ceil(keep * numel) entries of `flat` with the largest magnitude (every entry when
    keep >= 1). `numel` is the size of the tensor `flat` was computed from: a transform that pads
    has more coefficients than the tensor has values, and the budget follows the tensor.

    By default the cut is a magnitude threshold estimated from a sample (see :data:`SAMPLE`): linear
    time, within 10% of the budget, and fewer where fewer entries are nonzero (a zero is never
    kept). ``exact=True`` keeps exactly that many by a global top-k (n log k; ties broken by
    position order of topk). The index form is the smallest of :func:`index_bytes` for the number
    kept (one host sync on an accelerator: the number is data-dependent). `nonnegative`: `flat`
    has no negative entry (a ReLU output), so it is its own magnitude."""
    n = flat.numel()
    k = n if keep >= 1.0 else min(n, max(1, math.ceil(keep * (numel or n))))
    if k == n:
        return Sparse(flat.to(store).clone(), None, n)
    a = flat if nonnegative else flat.abs()
    if exact:
        idx = torch.sort(torch.topk(a, k, sorted=False).indices).values
    else:
        idx = at_least(a, _threshold(a, k))
    return _sparse(flat.index_select(0, idx).to(store), idx, n)


def _sparse(values: Tensor, idx: Tensor, n: int) -> Sparse:
    """`values`, the entries at the ascending positions `idx` of a flat vector of size `n`, with
    the cheapest index of :func:`index_bytes` (each built from `idx` in time linear in its size,
    but the bitmask's)."""
    costs = index_bytes(n, values.numel())
    kind = min(costs, key=costs.get)
    if kind == "bitmask":
        mask = torch.zeros(n, dtype=torch.bool, device=idx.device)
        mask[idx] = True
        return Sparse(values, pack_bits(mask), n)
    if kind == "chunk" and _numpy(idx):  # numpy's bincount: 2x ATen's
        where = idx.numpy()
        counts = np.bincount(where // CHUNK, minlength=-(-n // CHUNK)).astype(np.uint8)
        return Sparse(values, torch.from_numpy((where % CHUNK).astype(np.uint8)), n, torch.from_numpy(counts))
    if kind == "chunk":
        counts = torch.bincount(idx // CHUNK, minlength=-(-n // CHUNK)).to(torch.uint8)
        return Sparse(values, (idx % CHUNK).to(torch.uint8), n, counts)
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
