"""Storage sizes as in Deep Compression: dense, sparse (relative indices), shared (cluster
indices + codebook) and Huffman-coded, per tensor and in total; plus the bit-level encodings
the compact archive (surgery/io/archive.py) writes.

Relative indices: each non-zero stores the gap to the previous one in `b` bits; code 2^b - 1 is
an escape that skips 2^b - 1 positions and carries no value (Han et al. insert a zero-valued
filler instead; the escape costs only the index bits). `b` is chosen per tensor.
Zero means an all-zero bit pattern, so -0.0 is kept as a value and round trips bit-exactly.

Example::

    >>> import torch, surgery
    >>> net = torch.nn.Linear(64, 64)
    >>> report = surgery.compressed_size(net)
    >>> report.total("dense")
    16640
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .tensors import WeightParametrization, finalize

__all__ = ["compressed_size", "SizeReport", "TensorSize", "huffman_lengths", "pack_bits", "unpack_bits",
           "relative_codes", "positions_from_codes", "positions_in_steps", "section_lengths", "bit_view",
           "STAGES"]

STAGES = ("dense", "sparse", "shared", "huffman")
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}
_MAX_SHARED = 1 << 16
_CHUNK = 1 << 22  # values per packing chunk (a multiple of 8, so chunks stay byte aligned)


def bit_view(t: Tensor) -> Tensor | None:
    """The tensor's bit patterns as a same-width integer tensor (flat), or None for dtypes
    that are not floating point."""
    iv = _INT_VIEW.get(t.dtype)
    return None if iv is None else t.detach().contiguous().reshape(-1).view(iv)


# ---------------------------------------------------------------- bit packing
def pack_bits(values: Tensor, bits: int) -> bytes:
    """Pack non-negative integers (< 2^bits) into a little-endian bit stream, `bits` each."""
    out = []
    arr = values.reshape(-1).to(torch.int64).numpy()
    shifts = np.arange(bits, dtype=np.int64)
    for i in range(0, len(arr), _CHUNK):
        chunk = arr[i:i + _CHUNK]
        bitmat = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(buf: bytes | np.ndarray, count: int, bits: int, start: int = 0) -> Tensor:
    """Inverse of :func:`pack_bits`: `count` integers of `bits` bits each, from the `start`-th on.
    Raises ValueError when `buf` is too short to hold them: a damaged stream is never read past
    its end, and its counts never size an allocation `buf` cannot back."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if count < 0 or start < 0 or not 1 <= bits <= 63 or len(raw) * 8 < (start + count) * bits:
        raise ValueError(f"a packed stream of {len(raw)} bytes does not hold {bits}-bit values "
                         f"{start}..{start + count}")
    first = start - start % (8 // math.gcd(bits, 8))  # the nearest value before `start` that begins on a byte
    raw, skip, count = raw[first * bits // 8:], start - first, count + start - first
    weights = (1 << np.arange(bits, dtype=np.int64))
    parts = []
    per_chunk = _CHUNK * bits // 8
    for i in range(0, count, _CHUNK):
        n = min(_CHUNK, count - i)
        begin = (i // _CHUNK) * per_chunk
        bitvec = np.unpackbits(raw[begin:begin + (n * bits + 7) // 8], bitorder="little")[:n * bits]
        parts.append(bitvec.reshape(n, bits).astype(np.int64) @ weights)
    return torch.from_numpy(np.concatenate(parts)[skip:]) if parts else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------- relative indices
def _gaps(positions: Tensor) -> Tensor:
    """Gaps between sorted flat positions, the first counted from -1 (so every gap >= 1)."""
    return torch.diff(positions.to(torch.int64), prepend=torch.tensor([-1]))


def relative_codes(positions: Tensor, bits: int) -> Tensor:
    """The relative-index code stream for sorted flat `positions` with `bits`-bit codes:
    codes 0..M-1 (M = 2^bits - 1) mean "gap 1..M, then a value"; code M skips M positions."""
    m = (1 << bits) - 1
    d = _gaps(positions) - 1
    esc = d // m
    counts = esc + 1
    stream = torch.full((int(counts.sum()),), m, dtype=torch.int64)
    stream[torch.cumsum(counts, 0) - 1] = d - esc * m
    return stream


def positions_from_codes(codes: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`relative_codes`: the flat positions of the values."""
    m = (1 << bits) - 1
    real = codes != m
    step = torch.where(real, codes + 1, torch.full_like(codes, m))
    return (torch.cumsum(step, 0) - 1)[real]


def positions_in_steps(buf: bytes | np.ndarray, entries: int, bits: int, numel: int,
                       step: int = 1 << 15) -> Iterator[Tensor]:
    """The positions a packed stream of `entries` relative-index codes stands for, `step` codes
    at a time, so the index arrays stay small however long the stream is. Raises ValueError when
    the positions run past `numel` or the stream ends with skips that lead to no value."""
    base, last = 0, -1
    for s in range(0, entries, step):
        codes = unpack_bits(buf, min(step, entries - s), bits, start=s)
        # a sentinel code 0 ("gap 1, then a value") lands on the first position after these codes
        rel = positions_from_codes(torch.cat([codes, codes.new_zeros(1)]), bits)
        pos, base = rel[:-1] + base, base + int(rel[-1])
        if base > numel:
            raise ValueError(f"relative indices run past the tensor's {numel} elements")
        last = int(pos[-1]) if len(pos) else last
        yield pos
    if base != last + 1:
        raise ValueError("relative indices end with skips that lead to no value")


def _code_counts(gaps: Tensor, bits: int) -> tuple[int, Tensor]:
    """(stream length, symbol histogram) of the code stream, without building it."""
    m = (1 << bits) - 1
    d = gaps - 1
    esc = int((d // m).sum())
    hist = torch.bincount(d % m, minlength=m + 1)
    hist[m] += esc
    return len(gaps) + esc, hist


def best_index_bits(gaps: Tensor, max_bits: int = 16) -> int:
    """The code width that makes the relative-index stream shortest."""
    best, best_b = None, 1
    for b in range(1, max_bits + 1):
        m = (1 << b) - 1
        total = b * (len(gaps) + int(((gaps - 1) // m).sum()))
        if best is None or total < best:
            best, best_b = total, b
    return best_b


# ---------------------------------------------------------------- the archive's encodings, checked
_PARAMS = {"raw": ((), ()), "sparse": (("nnz",), ("index_bits", "entries")),
           "shared": (("nnz", "cluster_bits", "clusters"), ("index_bits", "entries"))}
_RANGE = {"nnz": (0, None), "entries": (0, None), "index_bits": (1, 32), "cluster_bits": (1, 16),
          "clusters": (1, _MAX_SHARED)}


def _int_in(v: object, lo: int, hi: int | None = None) -> bool:
    """`v` is an int (not a bool) in lo..hi."""
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def section_lengths(encoding: str, params: object, numel: int, dtype: torch.dtype) -> dict[str, int]:
    """The exact byte length of each section of a `numel`-element tensor that the compact archive
    stores as `encoding` (raw, sparse or shared) with `params`, once every param is checked: its
    type and range, and that they agree (nnz <= entries <= numel, clusters fit cluster_bits).
    Raises ValueError naming the wrong claim; computes, never allocates."""
    if not isinstance(encoding, str) or encoding not in _PARAMS:  # a fuzzed file may hold any JSON value
        raise ValueError(f"unknown encoding {encoding!r}"[:80])
    need, opt = _PARAMS[encoding]
    p = params if isinstance(params, dict) else {}
    if (p is not params or not set(need) <= set(p) <= {*need, *opt}
            or ("index_bits" in p) != ("entries" in p)):
        raise ValueError(f"{encoding} encoding needs params {list(need)} (and index_bits with entries, or "
                         f"neither), not {params!r}"[:200])
    for k, v in p.items():
        if not _int_in(v, *_RANGE[k]):
            raise ValueError(f"{k} = {v!r} is out of range {_RANGE[k]}"[:120])
    item = dtype.itemsize
    if encoding == "raw":
        return {"data": numel * item}
    if dtype not in _INT_VIEW:
        raise ValueError(f"{encoding} encoding is for floating tensors, not {dtype}")
    nnz, entries = p["nnz"], p.get("entries")
    if nnz > numel or (entries is not None and not nnz <= entries <= numel):
        raise ValueError(f"{nnz} values ({entries} relative indices) in {numel} elements")
    if entries is None and nnz != numel:
        raise ValueError(f"without relative indices every element is a value, but nnz is {nnz}, not {numel}")
    out = {} if entries is None else {"pos": (entries * p["index_bits"] + 7) // 8}
    if encoding == "sparse":
        return {**out, "values": nnz * item}
    if p["clusters"] > 1 << p["cluster_bits"]:
        raise ValueError(f"{p['clusters']} clusters do not fit {p['cluster_bits']}-bit cluster indices")
    return {**out, "idx": (nnz * p["cluster_bits"] + 7) // 8, "codebook": p["clusters"] * item}


# ---------------------------------------------------------------- Huffman
def huffman_lengths(counts: Iterable[int]) -> list[int]:
    """Huffman code lengths (bits) for symbols with the given counts (0 for unused symbols;
    a lone used symbol gets 1 bit)."""
    counts = [int(c) for c in counts]
    heap = [(c, i) for i, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
    if len(heap) <= 1:
        return lengths
    heapq.heapify(heap)
    parent = list(range(len(counts)))  # leaves first, then internal nodes
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        node = len(parent)
        parent.append(node)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, len(counts) - 1, -1):  # parents come after children
        depth[node] = depth[parent[node]] + 1
    for i, c in enumerate(counts):
        if c > 0:
            lengths[i] = depth[parent[i]] + 1
    return lengths


def _huffman_bits(hist: Tensor) -> int:
    """Payload bits plus a table of one byte (the code length) per symbol."""
    lengths = huffman_lengths(hist.tolist())
    return sum(int(c) * l for c, l in zip(hist.tolist(), lengths)) + 8 * len(lengths)


# ---------------------------------------------------------------- sizes
@dataclass
class TensorSize:
    """Bytes of one tensor at each stage (each stage keeps the smaller of its own encoding and
    the previous stage, as an encoder would)."""

    name: str
    shape: tuple
    numel: int
    nonzero: int
    distinct: int | None  # distinct non-zero values (None: too many to share)
    index_bits: int | None
    dense: int
    sparse: int
    shared: int
    huffman: int

    def bytes(self, stage: str) -> int:
        return getattr(self, stage)


def _analyse(name: str, t: Tensor) -> TensorSize:
    t = t.detach().cpu()
    dense = t.numel() * t.element_size()
    bits = bit_view(t)
    if bits is None or t.numel() == 0:
        return TensorSize(name, tuple(t.shape), t.numel(), t.numel(), None, None, dense, dense, dense, dense)
    item = t.element_size()
    nzmask = bits != 0
    vals = bits[nzmask]
    nnz = len(vals)
    sparse = shared = huffman = dense
    b = None
    pos_bits = pos_huff = 0
    if nnz < t.numel():
        gaps = _gaps(torch.nonzero(nzmask).reshape(-1))
        b = best_index_bits(gaps)
        entries, _ = _code_counts(gaps, b)
        pos_bits = entries * b
        pos_huff = min(_huffman_bits(_code_counts(gaps, hb)[1]) for hb in range(2, 13))
        sparse = min(dense, math.ceil(pos_bits / 8) + nnz * item)
    distinct = _distinct(vals)
    if distinct is not None:
        _, counts = torch.unique(vals, return_counts=True)
        cbits = max(1, math.ceil(math.log2(max(distinct, 1))))
        book = distinct * item
        candidates = [math.ceil((pos_bits + nnz * cbits) / 8) + book]
        if nnz < t.numel():  # zero as one more codebook entry, no positions
            candidates.append(math.ceil(t.numel() * max(1, math.ceil(math.log2(distinct + 1))) / 8) + book)
        shared = min(sparse, *candidates)
        huff = math.ceil((pos_huff + _huffman_bits(counts)) / 8) + book
        huffman = min(shared, huff)
    else:
        shared = huffman = sparse
    return TensorSize(name, tuple(t.shape), t.numel(), nnz, distinct, b, dense, sparse, shared, huffman)


def _distinct(vals: Tensor) -> int | None:
    """Number of distinct values, or None when there are more than 2^16 (checked on a sample
    first, so a dense float tensor costs no full sort)."""
    if len(vals) > 200_000:
        sample = vals[torch.randint(len(vals), (100_000,), generator=torch.Generator().manual_seed(0))]
        if len(torch.unique(sample)) > _MAX_SHARED:
            return None
    n = len(torch.unique(vals))
    return n if n <= _MAX_SHARED else None


@dataclass
class SizeReport:
    """Per-tensor and total storage in bytes; ``ratio(stage)`` is dense / stage."""

    tensors: list[TensorSize] = field(default_factory=list)

    def total(self, stage: str = "huffman") -> int:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return sum(t.bytes(stage) for t in self.tensors)

    def ratio(self, stage: str = "huffman") -> float:
        return self.total("dense") / max(self.total(stage), 1)

    def to_markdown(self, top: int | None = None) -> str:
        rows = ["| tensor | shape | nonzero | distinct | idx bits | dense | sparse | shared | huffman |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        shown = sorted(self.tensors, key=lambda t: -t.dense)[:top] if top else self.tensors
        for t in shown:
            rows.append(f"| {t.name} | {'x'.join(map(str, t.shape))} | {t.nonzero / max(t.numel, 1):.1%} | "
                        f"{t.distinct if t.distinct is not None else '-'} | {t.index_bits or '-'} | "
                        + " | ".join(_human(t.bytes(s)) for s in STAGES) + " |")
        rows.append("| **total** | | | | | " + " | ".join(f"**{_human(self.total(s))}**" for s in STAGES) + " |")
        rows.append("| **ratio to dense** | | | | | " + " | ".join(f"{self.ratio(s):.1f}x" for s in STAGES) + " |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.to_markdown()


def _human(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def compressed_size(model: nn.Module | Mapping[str, Tensor]) -> SizeReport:
    """Bytes of every tensor of `model`'s state_dict (or of a dict of tensors) as dense, sparse
    (relative-index CSR), shared (indices + codebook: tensors with at most 2^16 distinct
    non-zero values) and Huffman-coded (positions and cluster indices Huffman-coded, with
    their code-length tables), per tensor and in total. Active pruning masks and codebooks are
    measured as baked (on a finalized copy)."""
    if isinstance(model, nn.Module) and any(isinstance(m, WeightParametrization) for m in model.modules()):
        model = finalize(model)  # measure the weights the model computes with, not mask + original
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    return SizeReport([_analyse(n, t) for n, t in sd.items() if isinstance(t, Tensor)])
