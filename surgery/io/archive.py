"""The compact archive: a model's tensors without pickled code.

Layout (all integers little-endian)::

    b"SURGERY\\x01"  u64 header length  u32 header crc32  header (JSON, utf-8)
    data sections (raw bytes, one after another)           b"\\x01YREGRUS"

The header lists each tensor: name, dtype, shape, encoding and its sections as
(offset, length, crc32). Encodings: ``raw`` (the tensor's bytes), ``sparse`` (bit-packed
relative indices + the non-zero values), ``shared`` (optional relative indices + bit-packed
cluster indices + codebook). Each tensor takes the smallest that applies; every value is
stored as its bit pattern, so loading is bit-exact. A truncated or corrupted file raises
SurgeryError naming the file and the damaged part.

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

import copy
import json
import math
import os
import struct
import zlib
from collections import OrderedDict
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import SurgeryError
from ..weights.storage import (_gaps, _INT_VIEW, best_index_bits, bit_view, pack_bits, positions_from_codes,
                               relative_codes, unpack_bits)

__all__ = ["save", "load"]

MAGIC = b"SURGERY\x01"
TRAILER = b"\x01YREGRUS"
VERSION = 1
_MAX_CODEBOOK = 1 << 16


def _raw(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(buf: bytes, dtype: torch.dtype, count: int) -> Tensor:
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype)[:count].clone()


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


def _decode(enc: str, p: dict, sec: dict[str, bytes], dtype: torch.dtype, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    if enc == "raw":
        return _from_raw(sec["data"], dtype, numel).reshape(shape)
    iv = _INT_VIEW[dtype]
    if "index_bits" in p:
        positions = positions_from_codes(unpack_bits(sec["pos"], p["entries"], p["index_bits"]), p["index_bits"])
    else:
        positions = torch.arange(numel)
    if len(positions) != p["nnz"] or (len(positions) and int(positions[-1]) >= numel):
        raise ValueError("relative indices do not match the tensor's size")
    if enc == "sparse":
        vals = _from_raw(sec["values"], dtype, p["nnz"]).view(iv)
    elif enc == "shared":
        book = _from_raw(sec["codebook"], dtype, p["clusters"]).view(iv)
        idx = unpack_bits(sec["idx"], p["nnz"], p["cluster_bits"])
        if len(idx) and int(idx.max()) >= len(book):
            raise ValueError("cluster index outside the codebook")
        vals = book[idx]
    else:
        raise ValueError(f"unknown encoding {enc!r}")
    out = torch.zeros(numel, dtype=iv)
    out[positions] = vals
    return out.view(dtype).reshape(shape)


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


def _dtype(name: str, path: str, tensor: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise SurgeryError(f"{path}: corrupt archive: tensor {tensor!r} has unknown dtype {name!r}")
    return dt


def load(path: str | os.PathLike, model: nn.Module | None = None) -> "OrderedDict[str, Tensor] | nn.Module":
    """Read a surgery archive: the tensors by name, bit-exact; with `model`, a copy of it with
    those tensors loaded (strictly). Raises SurgeryError on a truncated or corrupted file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read the archive: {e}") from e
    fixed = len(MAGIC) + 12
    if len(blob) < fixed or blob[:len(MAGIC)] != MAGIC:
        what = "too short to be" if len(blob) < fixed and MAGIC.startswith(blob[:len(MAGIC)]) else "not"
        raise SurgeryError(f"{path}: {what} a surgery archive (expected it to start with {MAGIC!r})")
    hlen, hcrc = struct.unpack("<QI", blob[len(MAGIC):fixed])
    header_bytes = blob[fixed:fixed + hlen]
    if len(header_bytes) < hlen:
        raise SurgeryError(f"{path}: truncated archive: the header needs {hlen} bytes, the file holds "
                           f"{len(header_bytes)} after the preamble")
    if zlib.crc32(header_bytes) != hcrc:
        raise SurgeryError(f"{path}: corrupt archive: header checksum mismatch")
    try:
        header = json.loads(header_bytes)
        tensors, data_bytes = header["tensors"], int(header["data_bytes"])
    except (ValueError, KeyError, TypeError) as e:
        raise SurgeryError(f"{path}: corrupt archive: unreadable header ({e})") from e
    if header.get("version") != VERSION:
        raise SurgeryError(f"{path}: archive version {header.get('version')} is not supported (this is {VERSION})")
    data = memoryview(blob)[fixed + hlen:]
    if len(data) != data_bytes + len(TRAILER) or bytes(data[data_bytes:]) != TRAILER:
        raise SurgeryError(f"{path}: truncated or damaged archive: expected {data_bytes + len(TRAILER)} bytes "
                           f"after the header, found {len(data)}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for entry in tensors:
        name = entry.get("name", "?")
        secs = {}
        for key, (off, length, crc) in entry["sections"].items():
            chunk = bytes(data[off:off + length])
            if len(chunk) != length or zlib.crc32(chunk) != crc:
                raise SurgeryError(f"{path}: corrupt archive: checksum mismatch in section {key!r} of tensor {name!r}")
            secs[key] = chunk
        try:
            out[name] = _decode(entry["encoding"], entry["params"], secs,
                                _dtype(entry["dtype"], path, name), list(entry["shape"]))
        except SurgeryError:
            raise
        except Exception as e:  # consistent checksums but inconsistent contents: still a bad file
            raise SurgeryError(f"{path}: corrupt archive: tensor {name!r} cannot be decoded ({e})") from e
    if model is None:
        return out
    loaded = copy.deepcopy(model)
    try:
        loaded.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise SurgeryError(f"{path}: the archive does not fit {type(model).__name__}: {e}") from e
    return loaded
