"""Connected components of a graph given as two arrays of edge ends, all in numpy: how the
channel analysis turns couplings between channel elements into channels and groups."""
from __future__ import annotations

import numpy as np

__all__ = ["components"]


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes joined by edges a[i]-b[i], labelled 0..k-1 in order of
    their smallest node: min-label propagation with pointer jumping, all in numpy."""
    lab = np.arange(n, dtype=np.int64)
    while len(a):
        m = np.minimum(lab[a], lab[b])
        new = lab.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:  # labels are node ids no larger than the node's own: jump to the root
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, lab):
            break
        lab = new
    _, labels = np.unique(lab, return_inverse=True)
    return labels.reshape(-1)
