"""Fuzz the compact-archive loader (surgery.load): bit flips (with and without the checksums
repaired), truncations and inflated header claims (rewritten with a correct CRC) applied to
valid archives written by surgery.save. Property: every load either succeeds or raises a
SurgeryError, and allocates at most 2x the file's size plus max_bytes.

    OMP_NUM_THREADS=2 python benchmarks/fuzz_archive.py [--examples 500] [--seed 0]

Allocation is measured twice: exactly, through the loader's one allocation function (see
tests/test_file_errors.py, whose mutations and checks this script reuses), and as the growth of
peak RSS over each load (Linux: /proc/self/clear_refs resets the peak), which also sees what
does not go through that function. Exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

RSS_SLACK = 64 << 20  # interpreter and allocator noise allowed on top of the bound when measuring RSS


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=500, help="examples per mutation kind (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="max_bytes for each load (default: the tests' 1 MiB)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import pytest
    import test_file_errors as fz
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    limit = fz.FUZZ_LIMIT if args.limit is None else args.limit
    rss_ok = _reset_peak() and _status_kib("VmHWM") is not None
    counts: dict[str, collections.Counter] = {k: collections.Counter() for k in fz.KINDS}
    worst = {k: {"copy_ratio": 0.0, "expand": 0, "rss": 0, "rss_ratio": 0.0} for k in fz.KINDS}
    failures: list[str] = []
    seeds = fz.seed_archives()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_archive_"))
    t0 = time.perf_counter()
    def fuzz(kind: str) -> None:
        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def prop(data):
            blob = fz.mutate(data, kind)
            _reset_peak()
            before = _status_kib("VmRSS") if rss_ok else None
            try:
                outcome, used = fz.check_archive(blob, tmp / "fuzzed.surg", limit)
            except pytest.fail.Exception as e:  # the allocation bound (checked before allocating)
                outcome, used = "VIOLATION: allocation bound", None
                failures.append(f"{kind}: {e}: {blob[:64]!r}... ({len(blob)} bytes)")
            except Exception as e:  # anything but a SurgeryError
                outcome, used = f"FAILURE: {type(e).__name__}", None
                failures.append(f"{kind}: {type(e).__name__}: {e}: {blob[:64]!r}... ({len(blob)} bytes)")
            counts[kind][outcome] += 1
            w = worst[kind]
            if used is not None:
                w["copy_ratio"] = max(w["copy_ratio"], (used["file"] + used["copy"]) / max(len(blob), 1))
                w["expand"] = max(w["expand"], used["expand"])
            if before is not None:
                grown = max(0, (_status_kib("VmHWM") - before) * 1024)
                w["rss"], w["rss_ratio"] = max(w["rss"], grown), max(w["rss_ratio"], grown / max(len(blob), 1))
                if grown > 2 * len(blob) + limit + RSS_SLACK:
                    failures.append(f"{kind}: peak RSS grew {grown} bytes loading a {len(blob)}-byte file")

        prop()

    for kind in fz.KINDS:
        fuzz(kind)
    wall = time.perf_counter() - t0

    from _report import markdown_table, write_result
    summary = []
    for k in fz.KINDS:
        c, w = counts[k], worst[k]
        bad = sum(n for o, n in c.items() if o.startswith(("VIOLATION", "FAILURE")))
        summary.append([k, sum(c.values()), c["loaded"], sum(c.values()) - c["loaded"] - bad, bad,
                        f"{w['copy_ratio']:.2f}x", f"{w['expand']:,}",
                        f"{w['rss'] / 1024:,.0f} KiB" if rss_ok else "n/a"])
    tab = markdown_table(["mutation", "examples", "loaded", "SurgeryError", "other exception / violation",
                          "largest (file + copies) / file size", "largest expanded bytes (limit "
                          f"{limit:,})", "largest peak-RSS growth"], summary)
    for k in fz.KINDS:
        rows = [[f"`{o}`", n] for o, n in counts[k].most_common()]
        tab += f"\n\n**{k}**: outcomes\n\n" + markdown_table(["outcome", "count"], rows)
    sizes = ", ".join(f"{name} {len(blob):,} B" for name, blob in seeds.items())
    notes = (f"Seed archives (surgery.save): {sizes}. Examples per kind: {args.examples}, hypothesis seed "
             f"{args.seed}, wall {wall:.0f} s. bitflip: 1-8 random bits anywhere or only in the data section, "
             "half the time with every section CRC and the header CRC recomputed so the flips reach the decoder; truncate: a random prefix; "
             "inflate: one header claim (shape, nnz, entries, bit widths, clusters, section offset/length/crc, "
             "dtype, encoding, name, data_bytes, version, the preamble's header length, or a sparse tensor's "
             "shape made one huge dimension) set to a huge, negative or mistyped value, header CRC recomputed. "
             "Largest (file + copies) / file size is the exact bound the loader keeps (at most 2x); "
             "expanded bytes are the sparse/shared tensors' dense size, capped by max_bytes; peak-RSS "
             f"growth is measured around each load (violation past 2x file + limit + {RSS_SLACK >> 20} MiB).")
    if failures:
        notes += "\n\nFailures:\n\n" + "\n".join(f"- {f}" for f in failures[:20])
    path = write_result("fuzz_archive", "Fuzzing the compact-archive loader",
                        "OMP_NUM_THREADS=2 python " + " ".join(["benchmarks/fuzz_archive.py", *sys.argv[1:]]),
                        tab, notes)
    print(markdown_table(["mutation", "examples", "loaded", "SurgeryError", "bad", "copies/file", "expanded",
                          "peak RSS growth"], summary))
    print(f"{len(failures)} violations, {wall:.0f}s, {path}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
