"""The storage formats under the codecs: the sparse index of kept coefficients and the lossless
integer storage."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from passes.packing import CHUNK, IntegerCodec, index_bytes, keep_largest
from surgery.activations.memory import packed_tensors
from surgery.errors import SurgeryError


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


# ---------------------------------------------------------------- lossless integer storage
_I64 = torch.iinfo(torch.int64)


def _int_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(_I64.min, _I64.max, (6, 9), generator=g, dtype=torch.int64)
    wide[0, :3] = torch.tensor([_I64.min, _I64.max, _I64.min])  # differences that overflow int64
    return {
        "int64 random": wide,
        "int64 extremes": torch.tensor([[_I64.max, _I64.min], [0, _I64.max]]),
        "int64 small range": torch.randint(-5, 300, (3, 4, 5), generator=g),
        "int64 large steady rows": 10**12 + torch.arange(40).view(4, 10) * 3,
        "int32 random": torch.randint(-2**31, 2**31 - 1, (5, 7), generator=g, dtype=torch.int32),
        "int32 extremes": torch.tensor([-2**31, 2**31 - 1, -2**31], dtype=torch.int32),
        "int16": torch.randint(-2**15, 2**15 - 1, (4, 4), generator=g, dtype=torch.int16),
        "int8": torch.randint(-128, 127, (3, 5), generator=g, dtype=torch.int8),
        "uint8": torch.randint(0, 255, (2, 33), generator=g, dtype=torch.uint8),
        "0-d": torch.tensor(-7),
        "0-d int64 max": torch.tensor(_I64.max),
        "empty": torch.zeros(0, 3, dtype=torch.int64),
        "1-d": torch.arange(1000) * 7 - 3,
        "one column": torch.randint(0, 1000, (50, 1), generator=g),
        "non-contiguous": (torch.arange(60).view(3, 4, 5) * 11).transpose(0, 2)[:, ::2],
        "bool": torch.rand(3, 7, generator=g) > 0.5,
        "bool 0-d": torch.tensor(True),
    }


@pytest.mark.parametrize("name", list(_int_cases()))
def test_integer_codec_round_trip_is_bit_exact(name):
    x = _int_cases()[name]
    codec = IntegerCodec()
    packed = codec.pack(x)
    y = codec.unpack(packed)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device and torch.equal(y, x)
    if isinstance(packed, torch.Tensor):
        assert packed is x  # nothing narrower holds it: kept as it is
        return
    stored = [t.untyped_storage() for t in packed_tensors(packed)]
    assert all(s.data_ptr() != x.untyped_storage().data_ptr() for s in stored)  # copies, never views of x
    assert sum(s.nbytes() for s in stored) < x.numel() * x.element_size()


def test_integer_codec_picks_the_smallest_exact_form():
    codec = IntegerCodec()
    steady = codec.pack(10**12 + torch.arange(40).view(4, 10) * 3)
    assert steady.head.dtype == torch.int64 and steady.body.dtype == torch.int8  # deltas: 4 x 8 + 36 bytes
    small = codec.pack(torch.randint(-5, 100, (64,)))
    assert small.head is None and small.body.dtype == torch.int8  # the values fit int8 outright
    bits = codec.pack(torch.ones(100, dtype=torch.bool))
    assert bits.body.dtype == torch.uint8 and bits.body.numel() == 13
    x = torch.randint(_I64.min, _I64.max, (8, 8))
    assert codec.pack(x) is x
    wide_unsigned = torch.tensor([1, 2], dtype=torch.uint16)  # torch has no min/max for it: kept
    assert codec.pack(wide_unsigned) is wide_unsigned
    with pytest.raises(SurgeryError, match="IntegerCodec: got a torch.float32 tensor of shape \\(2,\\)"):
        codec.pack(torch.zeros(2))


@pytest.mark.parametrize("size, kernel, stride, padding", [(56, 3, 2, 1), (112, 3, 2, 1), (13, 2, 2, 0)])
def test_max_pool_indices_take_at_most_a_quarter_of_their_bytes(size, kernel, stride, padding):
    torch.manual_seed(0)
    _, idx = F.max_pool2d(torch.randn(2, 16, size, size), kernel, stride, padding, return_indices=True)
    packed = IntegerCodec().pack(idx)
    stored = sum(t.untyped_storage().nbytes() for t in packed_tensors(packed))
    assert stored <= idx.numel() * idx.element_size() / 4
    assert torch.equal(IntegerCodec().unpack(packed), idx)


# ---------------------------------------------------------------- the sampled threshold
def _relu_sparse(n: int, zeros: float, seed: int = 0) -> torch.Tensor:
    """A ReLU-like vector: a `zeros` fraction exactly zero, the rest positive, in a feature map's
    order (runs of zeros per channel, not shuffled)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, 40, 40, generator=g)
    x = torch.relu(x - torch.quantile(x[:1].flatten(), zeros)).reshape(-1)[:n]
    return x


@pytest.mark.parametrize("keep", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("kind", ["randn", "relu50", "relu90", "channels"])
def test_sampled_threshold_keeps_within_ten_percent_of_the_budget(kind, keep):
    g = torch.Generator().manual_seed(1)
    n = 8 * 64 * 40 * 40  # over the sample size at every keep here: the sampled path runs
    if kind == "randn":
        x = torch.randn(n, generator=g)
    elif kind == "channels":  # magnitudes that vary by channel: a strided sample would alias
        x = (torch.randn(8, 64, 1600, generator=g) * torch.linspace(0.01, 10, 64)[:, None]).reshape(-1)
    else:
        x = _relu_sparse(n, 0.5 if kind == "relu50" else 0.9)
    k = min(math.ceil(keep * n), int((x != 0).sum()))  # a zero is never kept (relu90 at 20%)
    s = keep_largest(x, keep, torch.float32)
    kept = s.values.numel()
    assert abs(kept - k) <= 0.1 * k, (kept, k)
    # what is kept is the largest: nothing dropped beats anything kept, and no zero is kept
    dense = s.dense(torch.float32)
    dropped = x.abs()[dense == 0]
    assert dropped.max() <= s.values.abs().min() and bool((s.values != 0).all())
    assert torch.equal(dense[dense != 0], x[dense != 0])


def test_exact_keeps_exactly_the_budget_and_the_sample_fewer_when_fewer_are_nonzero():
    x = _relu_sparse(8 * 64 * 40 * 40, 0.97)  # 3% nonzero, keep 5%
    k = math.ceil(0.05 * x.numel())
    exact = keep_largest(x, 0.05, torch.float32, exact=True)
    assert exact.values.numel() == k
    sampled = keep_largest(x, 0.05, torch.float32)
    assert sampled.values.numel() == int((x != 0).sum())  # every nonzero, and no zero
    assert torch.equal(sampled.dense(torch.float32), x)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 1 << 16])
def test_bit_packing_round_trips(n):
    from passes.packing import bits_as, pack_bits, unpack_bits
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(bits, n), mask)
    assert torch.equal(bits_as(bits, n, 2.5, torch.float32), mask.float() * 2.5)
    # the layout: least significant bit first, as numpy's packbits(bitorder="little")
    import numpy as np
    assert bits.tolist() == np.packbits(mask.numpy(), bitorder="little").tolist()


def _both_paths(monkeypatch, run):
    """`run()` with numpy doing the CPU work (the default) and with the ATen ops that other devices
    use; the two must agree."""
    import passes.packing as packing
    fast = run()
    monkeypatch.setattr(packing, "_numpy", lambda t: False)
    return fast, run()


@pytest.mark.parametrize("n", [0, 7, 1000, 1 << 16])
def test_bits_and_positions_agree_between_numpy_and_aten(monkeypatch, n):
    from passes.packing import bits_as, pack_bits, unpack_bits, zero_outside_
    g = torch.Generator().manual_seed(n)
    mask, y = torch.rand(n, generator=g) < 0.3, torch.randn(n, generator=g)

    def run():
        bits = pack_bits(mask)
        return (bits, pack_bits(mask.float()), unpack_bits(bits, n), bits_as(bits, n, 2.5, torch.float64),
                zero_outside_(y.clone(), bits), zero_outside_(torch.stack([y, y], 1)[:, 0], bits))  # strided: ATen
    fast, aten = _both_paths(monkeypatch, run)
    for a, b in zip(fast, aten):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(fast[4], y * mask) and torch.equal(fast[5], y * mask)


@pytest.mark.parametrize("n, keep, dtype", [(1000, 0.5, torch.float32), (10201, 0.05, torch.float16),
                                            (10000, 0.001, torch.float64), (70000, 0.05, torch.float32)])
def test_sparse_storage_agrees_between_numpy_and_aten(monkeypatch, n, keep, dtype):
    """Selection, the index (bitmask, chunk-local, int32), positions and the dense vector."""
    x = _distinct(n, seed=n).to(dtype)

    def run():
        s = keep_largest(x, keep, dtype)
        base = torch.full((n,), 0.25, dtype=dtype)
        return s, s.positions(), s.dense(dtype), s.dense(dtype, base=base)
    (s, *fast), (t, *aten) = _both_paths(monkeypatch, run)
    assert _kind(s) == _kind(t)
    for a, b in zip([s.values, s.index, s.counts, *fast], [t.values, t.index, t.counts, *aten]):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    assert torch.equal(fast[1][fast[0]], x[fast[0]]) and int((fast[1] != 0).sum()) == fast[0].numel()


@pytest.mark.parametrize("method", ["threshold", "dct", "wavelet"])
def test_codecs_agree_between_numpy_and_aten(monkeypatch, method):
    from passes.codecs import make_codec
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 20, 20, generator=g)
    codec = make_codec(method, keep=0.05)
    fast, aten = _both_paths(monkeypatch, lambda: [codec.unpack(codec.pack(t)) for t in (x, torch.relu(x))])
    for a, b in zip(fast, aten):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["threshold", "dct", "wavelet"])
def test_relu_outputs_come_back_with_their_zeros_and_no_subnormals(method):
    """A dropped positive comes back as a small normal number: the smallest normal (1e-38) made
    conv backward multiply into subnormals, several times slower on CPUs."""
    from passes.codecs import make_codec, positive_floor
    x = torch.relu(torch.randn(4, 16, 20, 20, generator=torch.Generator().manual_seed(0)))
    y = make_codec(method, keep=0.05).unpack(make_codec(method, keep=0.05).pack(x))
    assert torch.equal(y == 0, x == 0) and bool((y[x > 0] >= positive_floor(torch.float32)).all())
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((y != 0) & (y.abs() < tiny)).any())
    assert positive_floor(torch.float32) == 2.0 ** -64 and positive_floor(torch.float16) == torch.finfo(torch.float16).tiny


@pytest.mark.parametrize("h, w", [(8, 8), (10, 13), (7, 3), (1, 9), (28, 28), (5, 300), (256, 20)])
@pytest.mark.parametrize("wavelet", ["haar", "db3", "sym4"])
def test_transforms_are_orthonormal_and_invert(h, w, wavelet):
    from passes.transforms import SMALL, dwt, dwt_flat, dwt_flat_inverse, dwt_inverse, tiled_dct, tiled_dct_inverse
    x = torch.randn(3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    ll, details, layout = dwt(x, wavelet, 3)
    torch.testing.assert_close(dwt_inverse(ll, details, layout, wavelet), x, rtol=0, atol=1e-10)
    coeffs, layout = tiled_dct(x, 8)
    torch.testing.assert_close(tiled_dct_inverse(coeffs, layout), x, rtol=0, atol=1e-10)
    # orthonormal on the zero-padded planes: the coefficients hold exactly the planes' energy
    energy = ll.square().sum() + sum(d.square().sum() for d in details)
    torch.testing.assert_close(energy, x.square().sum())
    torch.testing.assert_close(coeffs.square().sum(), x.square().sum())
    # what the codec uses: planes of at most SMALL values take one whole-plane matrix, others dwt
    flat, layout = dwt_flat(x, wavelet, 3)
    assert (layout[0] == "whole") == (h * w <= SMALL)
    torch.testing.assert_close(dwt_flat_inverse(flat.clone(), layout, wavelet, 3), x, rtol=0, atol=1e-10)
    general = torch.cat([ll.reshape(-1)] + [d.reshape(-1) for d in details])  # the same coefficients,
    general = F.pad(general, (0, flat.numel() - general.numel()))  # and zeros where an LL band went on
    torch.testing.assert_close(flat.sort().values, general.sort().values, rtol=0, atol=1e-12)


def test_the_dct_of_a_plane_that_is_one_tile_is_scipys():
    from scipy.fft import dctn

    from passes.transforms import tiled_dct
    x = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coeffs, _ = tiled_dct(x, 8)  # one product with the whole-plane (Kronecker) matrix
    for m in range(3):
        torch.testing.assert_close(coeffs[m], torch.from_numpy(dctn(x[m].numpy(), norm="ortho")), rtol=0, atol=1e-12)


@pytest.mark.parametrize("h, w", [(16, 8), (16, 40)])  # narrow planes: side matrices; wide ones: tile products
def test_tiled_dct_is_scipys_dct_of_each_tile(h, w):
    from scipy.fft import dctn

    from passes.transforms import tiled_dct
    x = torch.randn(2, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coeffs, _ = tiled_dct(x, 8)
    for m in range(2):
        for i in range(h // 8):
            for j in range(w // 8):
                tile = x[m, 8 * i:8 * i + 8, 8 * j:8 * j + 8].numpy()
                torch.testing.assert_close(coeffs[m, 8 * i:8 * i + 8, 8 * j:8 * j + 8],
                                           torch.from_numpy(dctn(tile, norm="ortho")), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_linear_quantization_stays_within_a_step_of_each_value(bits, stochastic):
    from passes.codecs import QuantCodec
    g = torch.Generator().manual_seed(bits)
    # groups of 256: ordinary values, a ReLU-like group (low = 0 exactly), an offset narrow one, a constant one
    x = torch.cat([torch.randn(512, generator=g), torch.relu(torch.randn(256, generator=g)),
                   5.0 + 1e-3 * torch.rand(256, generator=g), torch.full((256,), -2.0)]).view(16, 80)
    codec = QuantCodec(bits, 256, stochastic)
    p = codec.pack(x)
    y = codec.unpack(p)
    groups = x.reshape(-1, 256)
    step = (groups.amax(1) - groups.amin(1)) / (2 ** bits - 1)
    err = (y - x).reshape(-1, 256).abs().amax(1)
    limit = (1.0 if stochastic else 0.5) * step + 1e-6 * groups.abs().amax(1)
    assert bool((err <= limit).all()), (err / step.clamp_min(1e-30)).tolist()
    assert torch.equal(y.view(-1)[-256:], x.view(-1)[-256:])  # a constant group comes back exactly
    if stochastic:  # unbiased: the mean of many draws approaches the value
        mean = torch.stack([codec.unpack(codec.pack(x)) for _ in range(200)]).mean(0)
        assert float(((mean - x).reshape(-1, 256).abs().amax(1) / step.clamp_min(1e-30))[:3].max()) < 0.25
