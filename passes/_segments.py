"""The segments of a channel group that ChannelPrune keeps the same share of: the groups of a
grouped convolution and each producer's piece of a concatenated group (see :func:`segments`).
"""
from __future__ import annotations

import numpy as np

from surgery.channels import ChannelGraph

__all__ = ["segments"]


def segments(cg: ChannelGraph) -> dict[int, list[np.ndarray]]:
    """Per group id: the segments of its channels (local indices) that each keep the same share,
    where it has any. A grouped convolution splits the channels it carries into its groups, so
    that it keeps as many in each; a producer that makes some of the group's channels (a branch
    of a concatenated stream: Inception-ResNet's, a dense block's layer, NextViT's projection)
    makes a piece, which keeps its share rather than going where another piece's weights are
    larger (l1 norms over other fan-ins do not compare). Segments nest or are disjoint, and the
    finest ones are used; where two overlap otherwise, only a grouped convolution that carries
    all of the group's channels is followed (or none)."""
    found: dict[int, list[np.ndarray]] = {}
    whole: dict[int, list[np.ndarray]] = {}
    for p in cg.places:
        grouped = p.groups > 1 and p.role in ("producer", "reader")
        if not grouped and p.role != "producer":
            continue
        chans = cg.chan_of_elem[p.ids]
        gids = cg.chan_group[chans]
        if len(chans) == 0 or (gids != gids[0]).any():
            continue
        group = cg.groups[int(gids[0])]  # chan_group counts within this graph
        if grouped:
            if len(chans) % p.groups or len(np.unique(chans)) != len(chans):
                continue
            parts = [np.sort(part) for part in cg.local_index[chans].reshape(p.groups, -1)]
            if len(chans) == group.size:
                whole.setdefault(group.id, parts)
        else:  # a producer of some of the group's channels: one piece
            piece = np.unique(cg.local_index[chans])
            if len(piece) == group.size:
                continue
            parts = [piece]
        found.setdefault(group.id, []).extend(parts)
    out: dict[int, list[np.ndarray]] = {}
    for gid, parts in found.items():
        atoms = _finest(list({part.tobytes(): part for part in parts}.values()))
        if atoms is not None:
            out[gid] = atoms
        elif gid in whole:
            out[gid] = whole[gid]
    return out


def _finest(parts: list[np.ndarray]) -> list[np.ndarray] | None:
    """The finest segments of `parts` (distinct sets of units, each pair nested or disjoint):
    the units grouped by the smallest part that holds them. None where two parts overlap without
    nesting. Largest first, each part must lie within one part seen before, or within none."""
    parts = sorted(parts, key=len, reverse=True)
    label = np.full(max(int(part.max()) for part in parts) + 1, -1)
    for i, part in enumerate(parts):
        held = label[part]
        if (held != held[0]).any():
            return None
        label[part] = i
    return [np.flatnonzero(label == i) for i in np.unique(label[label >= 0])]
