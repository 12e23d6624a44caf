"""The compact archive: a model's tensors without pickled code.

Layout (all integers little-endian)::

    b"SURGERY\\x01"  u64 header length  u32 header crc32  header (JSON, utf-8)
    data sections (raw bytes, one after another)           b"\\x01YREGRUS"

The header lists each tensor: name, dtype, shape, encoding and its sections as
(offset, length, crc32). Encodings: ``raw`` (the tensor's bytes), ``sparse`` (bit-packed
relative indices + the non-zero values), ``shared`` (optional relative indices + bit-packed
cluster indices + codebook). Each tensor takes the smallest that applies; every value is
stored as its bit pattern, so loading is bit-exact.

Loading trusts nothing in the file: it refuses anything but a regular file, and checks every
header field (type, range, agreement with the data section) before it sizes an allocation or
indexes anything; a damaged file raises :class:`BadModelFile` naming the file and the part.

Example::

    >>> import torch, surgery, tempfile, os
    >>> net = torch.nn.Linear(8, 4)
    >>> path = os.path.join(tempfile.mkdtemp(), "net.surg")
    >>> surgery.save(net, path)
    >>> state = surgery.load(path)
    >>> torch.equal(state["weight"], net.weight)
    True
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..copying import copy_module
from ..errors import BadModelFile, ConfigError, SurgeryError, first_line
from ..paths import regular_file
from ..weights.storage import (
    _INT_VIEW,
    _gaps,
    _int_in,
    best_index_bits,
    bit_view,
    pack_bits,
    positions_in_steps,
    relative_codes,
    section_lengths,
    unpack_bits,
)

__all__ = ["save", "load", "regular_file", "EXPAND_FLOOR", "EXPAND_RATIO"]

MAGIC = b"SURGERY\x01"
TRAILER = b"\x01YREGRUS"
VERSION = 1
_MAX_CODEBOOK = 1 << 16
EXPAND_FLOOR = 1 << 30   # max_bytes="auto": sparse/shared tensors may expand to max(1 GiB, ...
EXPAND_RATIO = 64        # ... 64 x the file's size) in total
_STEP = 1 << 18          # positions decoded per step: the index arrays stay small whatever the header claims
_DTYPES = {n: getattr(torch, n) for n in ("bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 "
           "bfloat16 float32 float64 complex32 complex64 complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz "
           "float8_e5m2fnuz").split() if isinstance(getattr(torch, n, None), torch.dtype)}  # what save writes


def _alloc(count: int, dtype: torch.dtype, kind: str) -> Tensor:
    """Every allocation whose size comes from the file, once checked: `kind` ``file`` (its bytes),
    ``copy`` (a section's bytes: sections may not overlap, so these add up to at most the file) or
    ``expand`` (a sparse/shared tensor's dense size: max_bytes). The fuzz tests record these."""
    try:
        return torch.empty(count, dtype=dtype)
    except RuntimeError as e:  # torch reports a failed allocation as a RuntimeError
        raise MemoryError(first_line(e)) from None


def _raw(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _encode(t: Tensor, compact: bool) -> tuple[str, dict, dict[str, bytes]]:
    """(encoding, parameters, sections) for one tensor: the smallest of raw/sparse/shared."""
    raw = {"data": _raw(t)}
    bits = bit_view(t) if compact else None
    if bits is None or t.numel() == 0:
        return "raw", {}, raw
    best = ("raw", {}, raw)
    size = len(raw["data"])
    nzmask = bits != 0
    vals = bits[nzmask]
    params: dict = {"nnz": len(vals)}
    pos: dict[str, bytes] = {}
    if len(vals) < t.numel():
        positions = torch.nonzero(nzmask).reshape(-1)
        b = best_index_bits(_gaps(positions))
        codes = relative_codes(positions, b)
        params.update(index_bits=b, entries=len(codes))
        pos = {"pos": pack_bits(codes, b)}
        values = {"values": _raw(vals)}
        if len(pos["pos"]) + len(values["values"]) < size:
            best, size = ("sparse", dict(params), {**pos, **values}), len(pos["pos"]) + len(values["values"])
    if 0 < len(vals) and (len(vals) <= 200_000 or len(torch.unique(vals[:200_000])) <= _MAX_CODEBOOK):
        book, inverse = torch.unique(vals, return_inverse=True)
        if len(book) <= _MAX_CODEBOOK:
            cbits = max(1, math.ceil(math.log2(len(book))))
            secs = {**pos, "idx": pack_bits(inverse, cbits), "codebook": _raw(book)}
            if sum(map(len, secs.values())) < size:
                best = ("shared", {**params, "cluster_bits": cbits, "clusters": len(book)}, secs)
    return best


def save(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, compact: bool = True) -> None:
    """Write `model`'s state_dict (or a dict of tensors) to `path` as a surgery archive.

    With ``compact=True`` each floating tensor is stored sparse and/or shared when that is
    smaller (call ``surgery.finalize`` first so pruning masks and codebooks are baked in);
    ``compact=False`` stores every tensor raw. The file is written atomically."""
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    entries, blobs, offset = [], [], 0
    for name, t in sd.items():
        if not isinstance(t, Tensor):
            raise SurgeryError(f"save: {name} is a {type(t).__name__}, not a tensor; only tensors are stored")
        t = t.detach().cpu()
        enc, params, secs = _encode(t, compact)
        sections = {}
        for key, data in secs.items():
            sections[key] = [offset, len(data), zlib.crc32(data)]
            blobs.append(data)
            offset += len(data)
        entries.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                        "encoding": enc, "params": params, "sections": sections})
    header = json.dumps({"format": "surgery-archive", "version": VERSION, "data_bytes": offset,
                         "tensors": entries}, separators=(",", ":")).encode()
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<QI", len(header), zlib.crc32(header)) + header)
        for data in blobs:
            f.write(data)
        f.write(TRAILER)
    os.replace(tmp, path)


# ---------------------------------------------------------------- loading: every claim checked first

@dataclass
class _Entry:
    """A checked header record; its sections are views of the file's bytes."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    numel: int
    encoding: str
    params: dict[str, int]
    sections: dict[str, np.ndarray]
    spans: list[tuple[int, int, str]]  # (start, end, section) in the data section


_MAX_NUMEL = (1 << 63) - 1  # torch indexes elements with int64


def _show(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _human(n: int) -> str:
    unit = next(((u, k) for u, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)) if n >= k), None)
    return f"{n:,} bytes" if unit is None else f"{n / unit[1]:.3g} {unit[0]} ({n:,} bytes)"


def _corrupt(path: str, problem: str, tensor: str | None = None) -> BadModelFile:
    return BadModelFile(path, f"corrupt archive: {'' if tensor is None else f'tensor {tensor!r}: '}{problem}")


def _read(path: str) -> np.ndarray:
    """The file's bytes. Refuses a non-regular file before opening it, and again on the open
    descriptor (opened non-blocking, so a path swapped for a FIFO in between cannot hang us)."""
    regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BadModelFile(path, f"cannot read ({e.strerror or first_line(e)})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        buf = _alloc(regular_file(path, f.fileno()).st_size, torch.uint8, "file").numpy()
        got, view = 0, memoryview(buf)
        try:
            while got < len(buf) and (n := f.readinto(view[got:])):
                got += n
            grew = f.read(1)
        except OSError as e:
            raise BadModelFile(path, f"cannot read ({e.strerror or first_line(e)})") from None
    if got != len(buf) or grew:
        raise BadModelFile(path, "changed while it was being read")
    return buf


def _header(path: str, buf: np.ndarray) -> tuple[list, np.ndarray]:
    """The header's tensor records and the data section (a view of `buf`), once the preamble,
    the header's checksum, its top-level fields and the trailer are checked."""
    fixed = len(MAGIC) + 12
    if len(buf) < fixed or bytes(buf[:len(MAGIC)]) != MAGIC:
        what = "too short to be" if len(buf) < fixed and MAGIC.startswith(bytes(buf[:len(MAGIC)])) else "not"
        raise BadModelFile(path, f"{what} a surgery archive (expected it to start with {MAGIC!r})")
    hlen, hcrc = struct.unpack("<QI", bytes(buf[len(MAGIC):fixed]))
    if hlen > len(buf) - fixed:
        raise BadModelFile(path, f"truncated archive: the header needs {hlen} bytes, the file holds "
                                 f"{len(buf) - fixed} after the preamble")
    text = buf[fixed:fixed + hlen]
    if zlib.crc32(text) != hcrc:
        raise _corrupt(path, "header checksum mismatch")
    try:
        header = json.loads(str(text, "utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise _corrupt(path, f"unreadable header ({first_line(e)})") from None
    if isinstance(header, dict) and not _int_in(header.get("version"), VERSION, VERSION):
        raise BadModelFile(path, f"archive version {_show(header.get('version'))} is not supported "
                                 f"(this is {VERSION})")
    if (not isinstance(header, dict) or set(header) != {"format", "version", "data_bytes", "tensors"}
            or header["format"] != "surgery-archive"
            or not _int_in(header["data_bytes"], 0) or not isinstance(header["tensors"], list)):
        raise _corrupt(path, "the header needs exactly format 'surgery-archive', version, data_bytes (an int) "
                             f"and tensors (a list); it has {_show(header)}")
    data, size = buf[fixed + hlen:], header["data_bytes"]
    if len(data) != size + len(TRAILER) or bytes(data[size:]) != TRAILER:
        raise BadModelFile(path, f"truncated or damaged archive: expected {size + len(TRAILER)} bytes "
                                 f"after the header, found {len(data)}")
    return header["tensors"], data[:size]


def _check_entry(path: str, e: object, data: np.ndarray) -> _Entry:
    """One tensor record with every field checked (type, range, agreement with the other fields
    and with the data section, checksums) before any of it sizes an allocation."""
    fields = {"name", "dtype", "shape", "encoding", "params", "sections"}
    if not isinstance(e, dict) or set(e) != fields or not isinstance(e["name"], str):
        raise _corrupt(path, f"a tensor record needs exactly {sorted(fields)} (name a string), not {_show(e)}")
    name, shape, enc, secs = e["name"], e["shape"], e["encoding"], e["sections"]
    bad = partial(_corrupt, path, tensor=name)
    dtype = _DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dtype is None:
        raise bad(f"unknown dtype {_show(e['dtype'])}")
    if not isinstance(shape, list) or not all(_int_in(d, 0) for d in shape):
        raise bad(f"shape {_show(shape)} is not a list of non-negative integers")
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():  # stops as soon as the product is past any real tensor
        if (numel := numel * d) > _MAX_NUMEL:
            raise bad(f"shape {_show(shape)} has more elements than torch can index")
    try:
        want = section_lengths(enc, e["params"], numel, dtype)
    except ValueError as err:
        raise bad(str(err)) from None
    if not isinstance(secs, dict) or set(secs) != set(want):
        raise bad(f"{enc} encoding needs sections {sorted(want)}, not {_show(secs)}")
    views, spans = {}, []
    for key, length in want.items():
        s = secs[key]
        if not (isinstance(s, list) and len(s) == 3 and _int_in(s[0], 0) and _int_in(s[1], 0)
                and _int_in(s[2], 0, 0xFFFFFFFF)):
            raise bad(f"section {key!r} is {_show(s)}, not [offset, length, crc32]")
        off, n, crc = s
        if n != length:
            raise bad(f"section {key!r} holds {n} bytes; its shape, dtype and params need {length}")
        if off + n > len(data):
            raise bad(f"section {key!r} ends at byte {off + n} of a {len(data)}-byte data section")
        views[key] = data[off:off + n]
        if zlib.crc32(views[key]) != crc:
            raise bad(f"checksum mismatch in section {key!r}")
        spans.append((off, off + n, key))
    return _Entry(name, dtype, shape, numel, enc, dict(e["params"]), views, spans)


def _check_layout(path: str, entries: list[_Entry], data_bytes: int) -> None:
    """Sections tile the data section: none overlaps another (so the copies made while loading
    add up to at most the file's size) and no byte belongs to no tensor (nothing ignored)."""
    spans = sorted((a, b, ent.name, key) for ent in entries for a, b, key in ent.spans if b > a)
    for (_, end, name, key), (start, _, name2, key2) in zip(spans, spans[1:]):
        if start < end:
            raise _corrupt(path, f"section {key2!r} of tensor {name2!r} overlaps section {key!r} of tensor {name!r}")
    covered = sum(b - a for a, b, _, _ in spans)
    if covered != data_bytes:
        raise _corrupt(path, f"{data_bytes - covered} bytes of the data section belong to no tensor")


def _copy(view: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A section's bytes as a tensor of `dtype` (its length was checked against the header)."""
    out = _alloc(len(view), torch.uint8, "copy")
    out.copy_(torch.from_numpy(view))
    return out.view(dtype)


def _decode(ent: _Entry) -> Tensor:
    if ent.encoding == "raw":
        t = _copy(ent.sections["data"], ent.dtype)
        if ent.dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise ValueError("a bool tensor holds bytes other than 0 and 1")
        return t.reshape(ent.shape)
    p, iv = ent.params, _INT_VIEW[ent.dtype]
    values = _copy(ent.sections["values" if ent.encoding == "sparse" else "codebook"], iv)
    out, done = _alloc(ent.numel, iv, "expand").zero_(), 0
    if "entries" in p:
        steps = positions_in_steps(ent.sections["pos"], p["entries"], p["index_bits"], ent.numel, _STEP)
    else:  # every element is a value (nnz == numel was checked)
        steps = (torch.arange(s, min(s + _STEP, ent.numel)) for s in range(0, ent.numel, _STEP))
    for pos in steps:
        n = len(pos)
        if done + n > p["nnz"]:
            raise ValueError(f"more relative indices than the {p['nnz']} values")
        if ent.encoding == "sparse":
            out[pos] = values[done:done + n]
        else:
            idx = unpack_bits(ent.sections["idx"], n, p["cluster_bits"], start=done)
            if n and int(idx.max()) >= len(values):
                raise ValueError(f"cluster index {int(idx.max())} outside the {len(values)}-entry codebook")
            out[pos] = values[idx]
        done += n
    if done != p["nnz"]:
        raise ValueError(f"{done} relative indices for {p['nnz']} values")
    return out.view(ent.dtype).reshape(ent.shape)


def load(path: str | os.PathLike, model: nn.Module | None = None, *,
         max_bytes: int | None | Literal["auto"] = "auto") -> "OrderedDict[str, Tensor] | nn.Module":
    """Read a surgery archive: the tensors by name, bit-exact; with `model`, a copy of it with
    those tensors loaded (strictly).

    `max_bytes` caps the bytes the sparse and shared tensors may expand to, in total: their dense
    size is the one claim the file cannot bound (an all-zero tensor takes no bytes), so without
    a cap a 300-byte file could ask for any amount of memory. ``"auto"``: max(1 GiB, 64 x the
    file's size); an int: that many bytes; ``None``: no limit, for files you trust.

    Raises BadModelFile (names the file and the damaged part) for anything but a regular file
    and for unreadable, truncated or corrupt archives; SurgeryError when the tensors would expand
    past `max_bytes` (names the tensor, its size and how to raise the limit) or do not fit `model`.
    """
    if not (max_bytes is None or max_bytes == "auto" or _int_in(max_bytes, 0)):
        raise ConfigError("surgery.load", "max_bytes", max_bytes, "an int >= 0, 'auto' or None (no limit)")
    path = os.fspath(path)
    buf = _read(path)
    limit = max(EXPAND_FLOOR, EXPAND_RATIO * len(buf)) if max_bytes == "auto" else max_bytes
    records, data = _header(path, buf)
    entries: list[_Entry] = []
    names, expand = set(), 0
    for record in records:
        ent = _check_entry(path, record, data)
        if ent.name in names:
            raise _corrupt(path, "two tensors have this name", ent.name)
        names.add(ent.name)
        size = ent.numel * ent.dtype.itemsize
        expand += size if ent.encoding != "raw" else 0
        if ent.encoding != "raw" and limit is not None and expand > limit:
            before = f", {_human(expand)} with the tensors before it" if expand > size else ""
            raise SurgeryError(f"{path}: tensor {ent.name!r} ({ent.encoding}, shape {_show(ent.shape)}) expands to "
                               f"{_human(size)}{before}, past the limit of {_human(limit)} (max_bytes={max_bytes!r}); "
                               "if you trust this file, pass surgery.load(..., max_bytes=N) or max_bytes=None")
        entries.append(ent)
    _check_layout(path, entries, len(data))
    out: OrderedDict[str, Tensor] = OrderedDict()
    for ent in entries:
        try:
            out[ent.name] = _decode(ent)
        except MemoryError:
            raise SurgeryError(f"{path}: tensor {ent.name!r}: not enough memory to expand it to "
                               f"{_human(ent.numel * ent.dtype.itemsize)}") from None
        except Exception as e:  # sizes and checksums agree but the contents do not: still a bad file
            raise _corrupt(path, f"cannot be decoded ({first_line(e)})", ent.name) from None
    if model is None:
        return out
    loaded = copy_module(model)
    try:
        loaded.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise SurgeryError(f"{path}: the archive does not fit {type(model).__name__}: {e}") from e
    return loaded
