"""select_indices: the weight cut of Shrink's edits and apply_plan's replay."""
from __future__ import annotations

import pytest
import torch

from surgery.shrink import cut


@pytest.mark.parametrize("shape", [(6, 5), (300, 70), (70, 300), (96, 80, 3, 3)])
def test_select_cuts_like_advanced_indexing(shape, monkeypatch):
    """index_select per axis (a weight over _SELECT_CHUNK bytes, here 4 KiB so that all but the
    first are, a chunk of its first-cut axis at a time) equals advanced indexing, whichever axis
    keeps less."""
    monkeypatch.setattr(cut, "_SELECT_CHUNK", 4096)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g)
    for keep0, keep1 in ((2, 3), (3, 2)):  # either axis may be the one cut first (keeps less)
        i = torch.randperm(shape[0], generator=g)[: shape[0] // keep0].sort().values
        j = torch.randperm(shape[1], generator=g)[: shape[1] // keep1 + 1].sort().values
        out = cut.select_indices(t, {0: i, 1: j})
        assert out.is_contiguous() and torch.equal(out, t[i[:, None], j])
        assert torch.equal(cut.select_indices(t, {1: j, 0: i}), out)
        assert torch.equal(cut.select_indices(t, {1: j}), t[:, j])
