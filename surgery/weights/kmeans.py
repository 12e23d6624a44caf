"""1-D k-means weight sharing (Deep Compression): cluster a tensor's values into ``2**bits``
shared values, zeros kept apart so pruned weights stay exactly zero.

Example::

    >>> import torch
    >>> from surgery.weights import kmeans_1d
    >>> centroids, labels = kmeans_1d(torch.tensor([1.0, 1.0, 5.0, 5.0, 9.0]), 3)
    >>> centroids.tolist(), labels.tolist()
    ([1.0, 5.0, 9.0], [0, 0, 1, 1, 2])
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import SurgeryError

__all__ = ["INITS", "kmeans_1d", "cluster_tensor", "share_tensor", "shared_values"]

INITS = ("linear", "density", "kmeans++")
_EXACT_LIMIT = 1 << 16      # up to this many values, k-means runs on the exact sorted unique values
_BINS = 1 << 16             # above it, on a 65536-bin histogram, then one exact pass over all values


def _init_centroids(p: Tensor, cnt: Tensor, k: int, init: str, seed: int) -> Tensor:
    """Initial centroids over weighted sorted points p (float64) with counts cnt."""
    if init == "linear":  # Han et al.: evenly spaced between min and max
        return torch.linspace(float(p[0]), float(p[-1]), k, dtype=torch.float64)
    if init == "density":  # evenly spaced on the CDF's y axis
        cdf = torch.cumsum(cnt, 0)
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k * cdf[-1]
        return p[torch.searchsorted(cdf, q).clamp(max=len(p) - 1)]
    if init == "kmeans++":  # D^2 sampling, weighted by counts, seeded
        g = torch.Generator().manual_seed(seed)
        chosen = [int(torch.multinomial(cnt, 1, generator=g))]
        d2 = (p - p[chosen[0]]) ** 2
        for _ in range(1, k):
            wgt = d2 * cnt
            if float(wgt.sum()) <= 0:
                break
            i = int(torch.multinomial(wgt, 1, generator=g))
            chosen.append(i)
            d2 = torch.minimum(d2, (p - p[i]) ** 2)
        return p[torch.tensor(chosen)]
    raise SurgeryError(f"unknown k-means init {init!r}; choose one of {', '.join(INITS)}")


def _lloyd(p: Tensor, cnt: Tensor, c: Tensor, iters: int) -> Tensor:
    """Lloyd's algorithm on sorted weighted 1-D points: each iteration is a searchsorted of the
    k-1 midpoints into the points plus prefix sums, so it costs O(k log P), not O(P).
    Empty clusters are re-seeded at the points with the largest error."""
    cw = torch.cat([cnt.new_zeros(1), torch.cumsum(cnt, 0)])
    cs = torch.cat([cnt.new_zeros(1), torch.cumsum(cnt * p, 0)])
    k = len(c)
    c = torch.sort(c).values
    tol = 1e-7 * float(p[-1] - p[0])  # centroid moves below this are invisible in the result
    for _ in range(iters):
        b = torch.searchsorted(p, (c[:-1] + c[1:]) / 2, right=True)
        lo = torch.cat([b.new_zeros(1), b])
        hi = torch.cat([b, b.new_full((1,), len(p))])
        n = cw[hi] - cw[lo]
        new = torch.where(n > 0, (cs[hi] - cs[lo]) / n.clamp(min=1e-300), c)
        empty = torch.nonzero(n == 0).reshape(-1)
        if len(empty):
            lab = torch.searchsorted((new[:-1] + new[1:]) / 2, p, right=False)
            err = cnt * (p - new[lab]) ** 2
            worst = torch.topk(err, min(len(empty), len(p))).indices
            worst = worst[err[worst] > 0]
            new[empty[:len(worst)]] = p[worst]
        new = torch.sort(new).values
        if float((new - c).abs().max()) <= tol:
            break
        c = new
    return c[:k]


def _assign(v: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid (sorted c) for each value of v (ties go to the lower one)."""
    return torch.searchsorted((c[:-1] + c[1:]) / 2, v, right=False) if len(c) > 1 else \
        torch.zeros(v.shape, dtype=torch.long)


def kmeans_1d(values: Tensor, k: int, init: str = "linear", *, iters: int = 300, seed: int = 0,
              skip_zeros: bool = False, values_only: bool = False) -> tuple[Tensor, Tensor]:
    """Cluster a 1-D tensor into at most `k` values: returns (centroids sorted ascending, labels).

    Fully vectorised and fast on tens of millions of values: up to 2^16 values Lloyd runs on
    the exact sorted unique values; above that on a 65536-bin histogram (counts and float64
    sums), every value takes the label of its bin and each centroid is set to the exact mean
    of its members. With at most `k` distinct values (in distinct bins) they are returned
    exactly. With ``skip_zeros`` zeros join no cluster: they get label ``len(centroids)``.
    With ``values_only`` the second result is the clustered values instead of the labels.
    """
    if k < 1:
        raise SurgeryError(f"k-means needs k >= 1, got {k}")
    if init not in INITS:
        raise SurgeryError(f"unknown k-means init {init!r}; choose one of {', '.join(INITS)}")
    v = values.detach().reshape(-1)
    if v.numel() == 0:
        return v.new_zeros(0), torch.zeros(0, dtype=torch.long)
    lo, hi = (float(t) for t in torch.aminmax(v))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # aminmax propagates NaN
        raise SurgeryError("k-means: the values contain inf or NaN")
    if v.numel() <= _EXACT_LIMIT:
        if values_only:
            c, lab = kmeans_1d(v, k, init, iters=iters, seed=seed, skip_zeros=skip_zeros)
            return c, shared_values(c, lab)
        if skip_zeros:
            nz = v != 0
            c, lab = kmeans_1d(v[nz], k, init, iters=iters, seed=seed)
            full = torch.full(v.shape, len(c), dtype=torch.long)
            full[nz] = lab
            return c, full
        p, cnt = torch.unique(v.double(), return_counts=True)
        if len(p) <= k:
            return p.to(v.dtype), _assign(v.double(), p)
        c = _lloyd(p, cnt.double(), _init_centroids(p, cnt.double(), k, init, seed), iters)
        return _exact_means(v, _assign(v.double(), c), c)
    # every value of one bin gets the same label (the cluster nearest the bin's mean), so the
    # exact centroid means come from per-bin float64 sums; a value lands at most one bin width
    # (range / 65536) from the boundary its exact nearest centroid would give it. Zeros that
    # must be skipped go to an extra bin that joins no cluster (no masked copies: they are slow)
    # v - lo is >= 0 and <= hi - lo (rounding is monotone); the (1 - 1e-6) margin keeps the
    # product below _BINS, so no clamp pass is needed
    scale = _BINS * (1 - 1e-6) / (hi - lo) if hi > lo else 1.0
    bins = torch.sub(v, lo).mul_(scale).to(torch.int32)
    if skip_zeros:
        bins.masked_fill_(v == 0, _BINS)
    cnt = torch.bincount(bins, minlength=_BINS + 1)[:_BINS].double()
    sums = torch.bincount(bins, weights=v.double(), minlength=_BINS + 1)[:_BINS]
    occupied = cnt > 0
    p, cnt_nz = sums[occupied] / cnt[occupied], cnt[occupied]
    lut = torch.zeros(_BINS + 1, dtype=torch.long)
    if len(p) == 0:  # nothing but skipped zeros
        return v.new_zeros(0), (torch.zeros_like(v) if values_only else torch.index_select(lut, 0, bins))
    c = p if len(p) <= k else _lloyd(p, cnt_nz, _init_centroids(p, cnt_nz, k, init, seed), iters)
    bin_lab = _assign(p, c)
    n = torch.zeros(len(c), dtype=torch.float64).index_add_(0, bin_lab, cnt_nz)
    s = torch.zeros(len(c), dtype=torch.float64).index_add_(0, bin_lab, sums[occupied])
    used = n > 0
    lut[:_BINS][occupied] = (torch.cumsum(used.long(), 0) - 1)[bin_lab]
    lut[_BINS] = int(used.sum())
    c = (s[used] / n[used]).to(v.dtype)
    if values_only:  # the shared values straight from the bins: saves a pass over the labels
        return c, torch.index_select(torch.cat([c, c.new_zeros(1)])[lut], 0, bins)
    return c, torch.index_select(lut, 0, bins)


def _exact_means(v: Tensor, lab: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Centroids = exact means of their members (float64 sums); empty clusters are dropped and
    the labels renumbered so the codebook holds only used values."""
    n = torch.bincount(lab, minlength=len(c))
    s = torch.zeros(len(c), dtype=torch.float64).index_add_(0, lab, v.double())
    used = n > 0
    means = (s[used] / n[used]).to(v.dtype)
    if bool(used.all()):
        return means, lab
    remap = torch.cumsum(used.long(), 0) - 1
    return means, remap[lab]


def cluster_tensor(w: Tensor, bits: int, init: str = "linear", *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means share the non-zero entries of `w` among at most 2^bits values.

    Returns (codebook, index): index has w's shape, int64; zeros get ``len(codebook)`` (a zero
    slot: zeros stay zero and take no codebook entry), so
    ``torch.cat([codebook, codebook.new_zeros(1)])[index]`` is the shared tensor.
    """
    if not 1 <= int(bits) <= 16:
        raise SurgeryError(f"weight sharing needs 1 <= bits <= 16, got {bits}")
    codebook, index = kmeans_1d(w.detach().reshape(-1), 1 << int(bits), init, seed=seed, skip_zeros=True)
    return codebook, index.reshape(w.shape)


def share_tensor(w: Tensor, bits: int, init: str = "linear", *, seed: int = 0) -> Tensor:
    """`w` with its non-zero entries replaced by their k-means centroid (the same clustering
    as :func:`cluster_tensor`, without materialising the index)."""
    if not 1 <= int(bits) <= 16:
        raise SurgeryError(f"weight sharing needs 1 <= bits <= 16, got {bits}")
    _, values = kmeans_1d(w.detach().reshape(-1), 1 << int(bits), init, seed=seed, skip_zeros=True,
                          values_only=True)
    return values.reshape(w.shape)


def shared_values(codebook: Tensor, index: Tensor) -> Tensor:
    """The shared tensor ``cat([codebook, 0])[index]`` (index_select: faster than fancy indexing)."""
    table = torch.cat([codebook, codebook.new_zeros(1)])
    return torch.index_select(table, 0, index.reshape(-1)).reshape(index.shape)
