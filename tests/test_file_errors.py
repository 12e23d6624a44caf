"""Nothing silently ignored, nothing that hangs: files that never end (FIFOs, devices,
directories) and compact archives whose header claims sizes the file cannot back each get one
clear SurgeryError; plus a fuzzer over compact archives (bit flips, truncations, inflated
header claims). benchmarks/fuzz_archive.py runs the same fuzzer with many more examples.

How allocation is measured: every allocation the archive loader sizes from the file goes
through ``surgery.io.archive._alloc`` (the file's bytes, copies of sections, the dense tensors
that sparse/shared sections expand to), so :func:`check_archive` replaces it with a spy that
adds up the bytes per kind and fails *before* allocating anything past the bound. That sees a
2 GiB claim without paying for it and is exact, where peak RSS is noisy and misses untouched
pages. What the spy cannot see (the JSON header's objects, the bounded per-step index arrays)
the benchmark covers by measuring peak RSS as well.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from surgery.errors import BadModelFile, ConfigError, SurgeryError
from surgery.io import archive
from surgery.io.files import load_model_file

ROOT = Path(__file__).resolve().parents[1]
FUZZ_LIMIT = 1 << 20  # max_bytes for fuzzed loads: an inflated sparse claim past 1 MiB must be refused
KINDS = ("bitflip", "truncate", "inflate")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or read() in the main
    thread, so a loader that opens a FIFO raises TimeoutError here rather than waiting forever."""
    def expire(signum, frame):
        raise TimeoutError(f"the loader was still blocked after {seconds}s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m surgery ARGS` with a timeout: a regression that blocks is killed, not waited on."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


# ---------------------------------------------------------------- files that are not regular files

def _special(tmp_path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(tmp_path / "model.pt")
        return tmp_path / "model.pt"
    if kind == "symlink to a fifo":
        os.mkfifo(tmp_path / "pipe")
        os.symlink(tmp_path / "pipe", tmp_path / "model.pt")
        return tmp_path / "model.pt"
    if kind == "directory":
        (tmp_path / "model.pt").mkdir()
        return tmp_path / "model.pt"
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(tmp_path / "model.pt"))
        except OSError as e:  # e.g. a path longer than AF_UNIX allows
            pytest.skip(f"cannot make a socket here: {e}")
        finally:
            sock.close()
        return tmp_path / "model.pt"
    return Path("/dev/null")  # a character device that reads as empty: no hang even before the fix


WHAT = {"fifo": "a FIFO", "symlink to a fifo": "a FIFO", "directory": "a directory", "socket": "a socket",
        "char device": "a character device"}


@pytest.mark.parametrize("kind", list(WHAT))
@pytest.mark.parametrize("loader", ["load_model_file", "surgery.load"])
def test_non_regular_files_are_refused_before_opening(tmp_path, kind, loader):
    if kind == "char device" and not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    path = _special(tmp_path, kind)
    load = load_model_file if loader == "load_model_file" else surgery.load
    with deadline(10), pytest.raises(BadModelFile) as err:
        load(path)
    assert str(err.value) == f"{path}: is {WHAT[kind]}, not a regular file"


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_cli_inspect_refuses_a_fifo_and_dev_zero_with_one_line(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "model.pt")
        path, what = tmp_path / "model.pt", "a FIFO"
    elif Path(target).exists():
        path, what = Path(target), "a character device"
    else:
        pytest.skip(f"no {target}")
    proc = run_cli("inspect", path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"surgery: error: {path}: is {what}, not a regular file"]


# ---------------------------------------------------------------- size claims

def split(blob: bytes) -> tuple[dict, bytes]:
    """(header, everything after it) of a well-formed archive."""
    hlen = int.from_bytes(blob[8:16], "little")
    return json.loads(blob[20:20 + hlen]), blob[20 + hlen:]


def assemble(header: dict, rest: bytes) -> bytes:
    """An archive with `header` (its length and CRC right, so the checksum hides nothing)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    return archive.MAGIC + struct.pack("<QI", len(text), zlib.crc32(text)) + text + rest


@contextlib.contextmanager
def recorded_allocs(bound: int | None = None, limit: int | None = None) -> Iterator[dict[str, int]]:
    """Bytes the archive loader allocates, per kind (file, copy, expand). With `bound` (2x the
    file's size) and `limit` (max_bytes), fails the test before allocating past either."""
    used = {"file": 0, "copy": 0, "expand": 0, "largest": 0}
    real = archive._alloc

    def spy(count: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
        n = count * dtype.itemsize
        used[kind] += n
        used["largest"] = max(used["largest"], n)
        # pytest.fail raises a BaseException: the loader's `except Exception` cannot swallow it
        if bound is not None and used["file"] + used["copy"] > bound:
            pytest.fail(f"allocation bound: file + copies {used} past 2x the file ({bound} bytes)")
        if limit is not None and used["expand"] > limit:
            pytest.fail(f"allocation bound: expanded tensors {used} past max_bytes={limit}")
        return real(count, dtype, kind)

    archive._alloc = spy
    try:
        yield used
    finally:
        archive._alloc = real


def _claim(tmp_path: Path, edit) -> Path:
    """A small sparse archive whose header `edit` rewrote (with the CRC recomputed)."""
    t = torch.zeros(64)
    t[[3, 40]] = torch.tensor([1.5, -2.0])
    surgery.save({"w": t}, tmp_path / "a.surg")
    header, rest = split((tmp_path / "a.surg").read_bytes())
    assert header["tensors"][0]["encoding"] == "sparse"
    edit(header["tensors"][0])
    (tmp_path / "a.surg").write_bytes(assemble(header, rest))
    return tmp_path / "a.surg"


def test_a_2gib_sparse_claim_in_a_tiny_file_is_refused_before_allocating(tmp_path):
    path = _claim(tmp_path, lambda rec: rec.update(shape=[1 << 29]))  # float32: 2 GiB
    size = path.stat().st_size
    assert size < 400
    for load in (surgery.load, load_model_file):
        with recorded_allocs() as used, pytest.raises(SurgeryError) as err:
            load(path)
        assert used["expand"] == used["copy"] == 0 and used["file"] <= size
        msg = str(err.value)
        assert msg.startswith(f"{path}: tensor 'w' (sparse, shape [536870912]) expands to 2 GiB")
        assert "max_bytes" in msg and "\n" not in msg and not isinstance(err.value, BadModelFile)


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r.update(encoding="raw", params={}, sections={"data": r["sections"]["values"]}, shape=[1 << 40]),
     "section 'data' holds 8 bytes"),
    (lambda r: r["params"].update(nnz=1 << 40), "values"),
    (lambda r: r["params"].update(entries=1 << 40), "relative indices"),
    (lambda r: r["params"].update(index_bits=1 << 20), "index_bits"),
    (lambda r: r["sections"]["values"].__setitem__(1, 1 << 40), "section 'values' holds"),
    (lambda r: r["sections"]["values"].__setitem__(0, 1 << 62), "section 'values' ends at byte"),
    (lambda r: r.update(shape=[1 << 62, 1 << 62]), "more elements than torch can index"),
    (lambda r: r.update(shape=[-1]), "shape [-1]"),
    (lambda r: r.update(dtype="qint8"), "unknown dtype"),
])
def test_inflated_claims_are_refused_naming_the_file_and_tensor(tmp_path, edit, fragment):
    path = _claim(tmp_path, edit)
    with recorded_allocs(bound=2 * path.stat().st_size, limit=0), pytest.raises(BadModelFile) as err:
        surgery.load(path, max_bytes=None)  # no limit: the file's size alone must refuse these
    assert str(err.value).startswith(f"{path}: corrupt archive: tensor 'w': ") and fragment in str(err.value)


def test_raising_the_limit_loads_a_large_but_sparse_tensor(tmp_path):
    big = torch.zeros(1_000_000)  # 4 MB dense, a few bytes stored
    big[[7, 500_000, 999_999]] = torch.tensor([1.0, -0.0, 3.0])
    surgery.save({"a": big, "b": big}, tmp_path / "big.surg")
    path = tmp_path / "big.surg"
    assert path.stat().st_size < 1000
    with pytest.raises(SurgeryError, match=r"tensor 'a' \(sparse, shape \[1000000\]\) expands to 3.81 MiB "
                                           r"\(4,000,000 bytes\), past the limit of 1 MiB"):
        surgery.load(path, max_bytes=1 << 20)
    with pytest.raises(SurgeryError, match=r"tensor 'b' .*, 7.63 MiB \(8,000,000 bytes\) with the tensors "
                                           r"before it, past the limit"):
        surgery.load(path, max_bytes=6_000_000)  # the limit is on the total
    for limit in (8_000_000, None, "auto"):
        with recorded_allocs() as used:
            state = surgery.load(path, max_bytes=limit)
        assert used["expand"] == 8_000_000
        assert all(torch.equal(state[k].view(torch.int32), big.view(torch.int32)) for k in "ab")
    with pytest.raises(ConfigError, match="max_bytes"):
        surgery.load(path, max_bytes=-1)


def test_bit_streams_are_read_in_bounded_steps_and_never_past_their_end():
    from surgery.weights.storage import pack_bits, positions_from_codes, positions_in_steps, relative_codes, unpack_bits
    v = torch.randint(0, 1 << 5, (1001,))
    buf = pack_bits(v, 5)
    for start in (0, 1, 7, 8, 13, 999):
        assert torch.equal(unpack_bits(buf, 1001 - start, 5, start=start), v[start:])
    with pytest.raises(ValueError, match="does not hold"):
        unpack_bits(buf, 1 << 40, 5)  # a count the buffer cannot back: refused before allocating
    pos = torch.tensor([0, 3, 4, 90, 91, 700, 4000])
    codes = relative_codes(pos, 3)
    packed = pack_bits(codes, 3)
    for step in (1, 2, 5, 1000):
        assert torch.equal(torch.cat(list(positions_in_steps(packed, len(codes), 3, 4001, step))), pos)
    assert torch.equal(positions_from_codes(codes, 3), pos)
    with pytest.raises(ValueError, match="run past"):
        list(positions_in_steps(packed, len(codes), 3, 4000, 2))
    with pytest.raises(ValueError, match="end with skips"):
        skips = pack_bits(torch.cat([codes, torch.full((3,), 7)]), 3)
        list(positions_in_steps(skips, len(codes) + 3, 3, 5000))


# ---------------------------------------------------------------- the fuzzer

@lru_cache(maxsize=None)
def seed_archives() -> dict[str, bytes]:
    """Valid archives written by surgery.save: dense (raw), sparse, weight-shared (with and
    without relative indices), mixed dtypes, and a pruned + weight-shared network."""
    import tempfile

    from passes import MagnitudePrune, WeightShare
    torch.manual_seed(0)  # the network's initialisation: the same seeds in the tests and the benchmark
    g = torch.Generator().manual_seed(0)
    sparse = torch.zeros(60, 50)
    sparse[::7, ::3] = torch.randn(9, 17, generator=g)
    shared = torch.tensor([0.0, 0.25, -1.5, 2.0])[torch.randint(0, 4, (40, 30), generator=g)]
    mixed = {"h16": torch.randn(5, 7, generator=g).half(), "b16": torch.randn(33, generator=g).bfloat16(),
             "f64": torch.tensor(3.5, dtype=torch.float64), "flags": torch.tensor([True, False, True]),
             "steps": torch.arange(6), "empty": torch.zeros(0, 4), "odd": torch.tensor([-0.0, float("nan"), 1.0]),
             "sparse16": (sparse[:20] * 3).half(), "dense": torch.randn(4, 4, generator=g)}
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 10))
    pruned = surgery.finalize(surgery.compress(net, [MagnitudePrune(0.9), WeightShare(3)],
                                               example_inputs=torch.randn(2, 3, 8, 8)))
    models = {"dense": ({"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}, False),
              "sparse": ({"w": sparse, "bias": torch.zeros(50)}, True),
              "shared": ({"w": shared, "nozero": shared[shared != 0][:500].clone()}, True),
              "mixed": (mixed, True), "pruned": (pruned, True)}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, (model, compact) in models.items():
            surgery.save(model, Path(d) / name, compact=compact)
            out[name] = (Path(d) / name).read_bytes()
    return out


def flip_bits(blob: bytes, bits: list[int], fix_checksums: bool) -> bytes:
    """`blob` with the given bits flipped; with `fix_checksums`, every section CRC and the header
    CRC recomputed where the header still parses, so the flips reach the decoder."""
    b = bytearray(blob)
    for i in bits:
        b[(i // 8) % len(b)] ^= 1 << (i % 8)
    if not fix_checksums:
        return bytes(b)
    hlen = int.from_bytes(b[8:16], "little")
    try:
        header, rest = json.loads(bytes(b[20:20 + hlen])), bytes(b[20 + hlen:])
        for rec in header["tensors"]:
            for sec in rec["sections"].values():
                sec[2] = zlib.crc32(rest[sec[0]:sec[0] + sec[1]])
        return assemble(header, rest)
    except Exception:  # the flips broke the header's JSON or shape: just make its CRC agree
        b[16:20] = struct.pack("<I", zlib.crc32(bytes(b[20:20 + hlen])))
        return bytes(b)


HUGE = [1 << 29, 1 << 31, (1 << 32) + 1, 1 << 40, 1 << 62, 1 << 63, 1 << 64, 10 ** 40, -1, 0, 1, 7,
        True, 1.5, "9", None, [], {}]
FIELDS = ["shape", "nnz", "entries", "index_bits", "cluster_bits", "clusters", "offset", "length", "crc",
          "dtype", "encoding", "name", "data_bytes", "version", "hlen", "flat shape"]


def inflate(blob: bytes, tensor: int, field: str, value, extra: int) -> bytes:
    """`blob` with one header claim replaced by `value` (the header's CRC kept right)."""
    if field == "hlen":
        return blob[:8] + struct.pack("<Q", value % (1 << 64) if type(value) is int else 1 << 40) + blob[16:]
    header, rest = split(blob)
    # prefer a tensor the claim applies to: one with that param, or a sparse/shared one for shapes
    fits = [r for r in header["tensors"] if field in r["params"] or (field == "flat shape" and r["params"])]
    rec = (fits or header["tensors"])[tensor % len(fits or header["tensors"])]
    if field in ("data_bytes", "version"):
        header[field] = value
    elif field == "shape":
        rec["shape"] = (rec["shape"] or [1])[:]
        rec["shape"][extra % len(rec["shape"])] = value
    elif field == "flat shape":  # the 2 GiB attack: a sparse tensor's indices stay valid in any larger shape
        rec["shape"] = [value]
    elif field in ("offset", "length", "crc"):
        key = sorted(rec["sections"])[extra % len(rec["sections"])]
        rec["sections"][key][("offset", "length", "crc").index(field)] = value
    elif field in ("dtype", "encoding", "name"):
        rec[field] = value if extra % 2 else str(value)
    else:
        rec["params"][field] = value
    return assemble(header, rest)


def gist(e: BaseException) -> str:
    """An error's class and message with the path, names and numbers taken out: the outcome."""
    msg = str(e).split(": ", 1)[-1]
    msg = re.sub(r"'[^']*'|\[[^\]]*(\]|$)|\{.*(\}|$)", "…", msg)
    return f"{type(e).__name__}: {re.sub(r'-?[0-9][0-9,.e+]*', 'N', msg)[:90]}"


def check_archive(blob: bytes, path: Path, limit: int = FUZZ_LIMIT) -> tuple[str, dict[str, int]]:
    """Load `blob` from `path`: ('loaded' or the SurgeryError's gist, bytes allocated per kind).
    Fails on any other exception, or (before allocating) on more than 2x the file's size in file
    bytes and copies or more than `limit` in expanded tensors."""
    path.write_bytes(blob)
    with recorded_allocs(bound=2 * len(blob), limit=limit) as used:
        try:
            surgery.load(path, max_bytes=limit)
        except SurgeryError as e:
            return gist(e), used
    return "loaded", used


def mutate(data: st.DataObject, kind: str) -> bytes:
    """One mutated archive drawn by hypothesis: a seed archive, then `kind` applied to it."""
    blob = seed_archives()[data.draw(st.sampled_from(sorted(seed_archives())), label="seed")]
    if kind == "bitflip":  # anywhere, or only in the data section (where repaired CRCs let flips reach the decoder)
        lo = data.draw(st.sampled_from([0, 20 + int.from_bytes(blob[8:16], "little")]), label="from byte")
        bits = data.draw(st.lists(st.integers(8 * lo, 8 * (len(blob) - len(archive.TRAILER)) - 1),
                                  min_size=1, max_size=8), label="bits")
        return flip_bits(blob, bits, data.draw(st.booleans(), label="fix checksums"))
    if kind == "truncate":
        return blob[:data.draw(st.integers(0, len(blob) - 1), label="cut")]
    value = data.draw(st.sampled_from(HUGE) | st.integers(-(1 << 70), 1 << 70), label="value")
    return inflate(blob, data.draw(st.integers(0, 50)), data.draw(st.sampled_from(FIELDS), label="field"),
                   value, data.draw(st.integers(0, 10)))


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_archives_raise_only_surgery_errors_within_the_allocation_bound(tmp_path, kind):
    @settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def prop(data):
        check_archive(mutate(data, kind), tmp_path / "fuzzed.surg")

    prop()


def test_seed_archives_load_and_cover_every_encoding(tmp_path):
    encodings = set()
    for name, blob in seed_archives().items():
        assert check_archive(blob, tmp_path / name)[0] == "loaded", name
        header, _ = split(blob)
        encodings |= {(r["encoding"], "pos" in r["sections"]) for r in header["tensors"]}
    assert encodings == {("raw", False), ("sparse", True), ("shared", True), ("shared", False)}


@pytest.mark.parametrize("encoding", [[], {}, 3, None])
def test_an_encoding_that_is_not_a_name_is_refused_as_unknown(encoding):
    """Found by the archive fuzzer: a JSON list where the encoding's name goes raised TypeError."""
    from surgery.weights.storage import section_lengths
    with pytest.raises(ValueError, match="unknown encoding"):
        section_lengths(encoding, {}, 128, torch.float32)
