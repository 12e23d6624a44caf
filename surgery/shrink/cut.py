"""Cutting a tensor down to the indices it keeps: how Shrink's edits and apply_plan's replay cut
a weight, fast and without holding a second copy of it; and where a slice of the kept positions
lands after the cut."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..errors import SurgeryError

__all__ = ["select_indices", "slice_of_kept"]


_SELECT_CHUNK = 4 << 20  # bytes of a weight's rows cut at a time (see select_indices)


def select_indices(t: torch.Tensor, picks: dict[int, torch.Tensor]) -> torch.Tensor:
    """`t` with only the indices `picks` (axis -> kept indices, on `t`'s device) lists along
    each axis, by ``index_select`` (2-4x faster on one CPU thread than one advanced index
    ``t[i[:, None], j]``), the axis keeping the smallest share first. A large weight cut on two
    or more axes is cut a few MiB of its first-cut axis at a time into the one result tensor:
    one index_select after another would leave a freed intermediate of up to half the weight per
    tensor, which the allocator keeps (+0.02 of a 1.1B Llama's weights at peak in
    benchmarks/llm_scale.py)."""
    dims = sorted(picks, key=lambda d: len(picks[d]) / t.shape[d])
    if len(dims) < 2 or t.numel() * t.element_size() <= _SELECT_CHUNK:
        for dim in dims:
            t = t.index_select(dim, picks[dim])
        return t
    first, idx = dims[0], picks[dims[0]]
    shape = list(t.shape)
    for dim in dims:
        shape[dim] = len(picks[dim])
    out = t.new_empty(shape)
    step = max(1, _SELECT_CHUNK * t.shape[first] // (t.numel() * t.element_size()))
    for start in range(0, len(idx), step):
        piece = t.index_select(first, idx[start:start + step])
        for dim in dims[1:]:
            piece = piece.index_select(dim, picks[dim])
        out.narrow(first, start, piece.shape[first]).copy_(piece)
    return out


def slice_of_kept(i: slice, kept: np.ndarray, node: fx.Node) -> slice:
    """The slice of the kept positions that takes what `i` took of the kept ones among the
    original positions `kept` (a boolean mask); a step survives where they stay evenly spaced."""
    start, stop, step = i.indices(len(kept))
    new = np.cumsum(kept) - 1  # original position -> its index after the cut
    wanted = [int(new[p]) for p in range(start, stop, step) if kept[p]]
    if not wanted:
        at = int(kept[:start].sum())
        return slice(at, at)
    gaps = set(np.diff(wanted).tolist()) or {1}
    if len(gaps) != 1 or step < 0:
        raise SurgeryError(f"Shrink: the kept positions of {node.name!r}'s strided slice are not evenly spaced")
    gap = gaps.pop()
    return slice(wanted[0], wanted[-1] + 1, gap if gap != 1 else None)
