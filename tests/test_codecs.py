"""The storage formats under the codecs: the sparse index of kept coefficients."""
from __future__ import annotations

import pytest
import torch

from passes.codecs import CHUNK, index_bytes, keep_largest
from surgery.memory import packed_tensors


def _distinct(n: int, seed: int = 0) -> torch.Tensor:
    """n values with distinct magnitudes (so the kept set is unique), random signs and order."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.randperm(n, generator=g).double() + 1
    return mags * (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1)


def _kind(s) -> str:
    if s.counts is not None:
        return "chunk"
    return "bitmask" if s.index.dtype == torch.uint8 else "int32"


@pytest.mark.parametrize("n, keep, kind", [(1000, 0.5, "bitmask"), (1000, 0.05, "chunk"), (10201, 0.05, "chunk"),
                                           (10000, 0.001, "int32"), (7, 0.3, "bitmask")])
def test_each_index_kind_round_trips_exactly(n, keep, kind):
    x = _distinct(n)
    s = keep_largest(x, keep, torch.float64)
    k = s.values.numel()
    assert _kind(s) == kind
    costs = index_bytes(n, k)
    assert costs[kind] == min(costs.values())
    # bytes as computed: the values in the stored dtype plus the index the analytic cost names
    stored = sum(t.untyped_storage().nbytes() for t in packed_tensors(s))
    assert stored == 8 * k + costs[kind]
    positions = x.abs().topk(k).indices.sort().values
    assert torch.equal(s.values, x[positions])  # ascending position order
    assert torch.equal(s.positions(), positions)
    expected = torch.zeros_like(x)
    expected[positions] = x[positions]
    assert torch.equal(s.dense(torch.float64), expected)


def test_chunk_index_with_a_full_chunk_empty_chunks_and_a_partial_last_chunk():
    n = CHUNK * 40 + 17
    x = torch.full((n,), 0.5, dtype=torch.float64)
    x[3 * CHUNK:4 * CHUNK] = torch.arange(CHUNK, dtype=torch.float64) + 10  # every position of chunk 3
    x[[0, 5, 254]] = -100.0 - torch.arange(3, dtype=torch.float64)
    x[-17:] = 1000.0 + torch.arange(17, dtype=torch.float64)  # the partial last chunk, all kept
    k = CHUNK + 3 + 17
    s = keep_largest(x, k / n, torch.float64)
    assert _kind(s) == "chunk" and s.values.numel() == k
    counts = s.counts.long()
    assert counts[3] == CHUNK and counts[0] == 3 and counts[-1] == 17 and counts.sum() == k
    assert int((counts == 0).sum()) == counts.numel() - 3
    expected = torch.where(x.abs() > 1, x, torch.zeros_like(x))
    assert torch.equal(s.dense(torch.float64), expected)


def test_every_value_kept_stores_no_index():
    x = _distinct(50)
    s = keep_largest(x, 1.0, torch.float32)
    assert s.index is None and s.counts is None and torch.equal(s.dense(torch.float64), x.float().double())
    assert torch.equal(s.positions(), torch.arange(50))


@pytest.mark.parametrize("n, k", [(100, 1), (10_000, 500), (10_000, 1_400), (256, 256), (1 << 20, 50_000)])
def test_index_bytes_are_the_three_analytic_costs(n, k):
    assert index_bytes(n, k) == {"bitmask": -(-n // 8), "chunk": k + -(-n // CHUNK), "int32": 4 * k}
