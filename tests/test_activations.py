"""CompressActivations, its codecs and surgery.activation_memory."""
from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

import surgery
from passes import CompressActivations, CompressedRegion, strip_compression
from passes.codecs import DCTCodec, QuantCodec, RandomCodec, ThresholdCodec, WaveletCodec, make_codec
from passes.packing import IntegerCodec, IntPacked, index_bytes
from surgery.activations.memory import packed_tensors
from surgery.errors import ConfigError, SurgeryError


class SmallCNN(nn.Module):
    """Odd spatial sizes, in-place ReLU, max pooling (integer indices), a residual add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = x + self.conv3(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TokenMLP(nn.Module):
    """A transformer-style block on (N, L, D) tokens: LayerNorm, GELU, residual."""

    def __init__(self, d=24):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _grads(model, x):
    torch.manual_seed(0)
    model.zero_grad()
    model(x).float().square().mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(4, 3, 13, 11)


def test_none_is_bit_identical_to_the_uncompressed_model():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    gm = surgery.compress(net, [CompressActivations("none")], x)
    assert torch.equal(_grads(gm, x), _grads(net, x))


@pytest.mark.parametrize("method", ["threshold", "dct", "wavelet"])
@pytest.mark.parametrize("model", ["cnn", "tokens"])
def test_invertible_methods_at_keep_one_match_gradients(method, model, cnn):
    torch.manual_seed(0)
    net, x = cnn if model == "cnn" else (TokenMLP(), torch.randn(3, 17, 24))
    gm = surgery.compress(net, [CompressActivations(method, keep=1.0)], x)
    g, ref = _grads(gm, x), _grads(net, x)
    assert (g - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["threshold", "dct", "wavelet"])
def test_lossy_gradient_similarity_rises_with_keep(method, cnn, record_property):
    net, x = cnn
    ref = _grads(net, x)
    sims = []
    for keep in (0.02, 0.1, 0.3, 0.7):
        gm = surgery.compress(net, [CompressActivations(method, keep=keep)], x)
        sims.append(_cos(_grads(gm, x), ref))
    record_property(f"{method}_cosine", sims)
    print(f"{method}: gradient cosine at keep 0.02/0.1/0.3/0.7 = " + ", ".join(f"{s:.4f}" for s in sims))
    assert all(a < b for a, b in zip(sims, sims[1:])), sims
    assert sims[-1] > 0.95


def test_quantization_and_random_baseline_similarity(cnn, record_property):
    net, x = cnn
    ref = _grads(net, x)
    sims = {m: _cos(_grads(surgery.compress(net, [CompressActivations(m)], x), x), ref)
            for m in ("random", "int4", "int8")}
    record_property("quant_cosine", sims)
    print("gradient cosine:", {k: round(v, 4) for k, v in sims.items()})
    assert sims["random"] < sims["int4"] < sims["int8"]
    assert sims["int8"] > 0.99


@pytest.mark.parametrize("codec", [ThresholdCodec(0.05), DCTCodec(0.05), WaveletCodec(0.05), DCTCodec(0.001),
                                   QuantCodec(8), QuantCodec(4), RandomCodec()], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_storage_is_packed_on_device_and_dtype_preserved(codec, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 24, 24, dtype=dtype)
    packed = codec.pack(x)
    tensors = list(packed_tensors(packed))
    assert all(t.device == x.device and t.dtype != torch.int64 for t in tensors)
    stored = sum(t.untyped_storage().nbytes() for t in tensors)
    dense = x.numel() * x.element_size()
    budget = {"int8": 1 / x.element_size() + 0.04, "int4": 0.5 / x.element_size() + 0.04, "random": 0.0}
    # sparse: values (keep * numel in x's dtype) + the cheapest of bitmask, chunk-local, int32 positions
    # (no transform here pads: 24 is a multiple of the DCT block and halves evenly for the DWT)
    limit = budget.get(codec.name, None)
    if limit is None:
        k = math.ceil(codec.keep * x.numel())
        limit = (k * x.element_size() + min(index_bytes(x.numel(), k).values())) / dense
    assert stored <= limit * dense + 64, (stored, dense)
    y = codec.unpack(packed)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device


def test_exact_bytes_counted_and_relu_output_packed_once():
    net = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 4))
    x = torch.randn(4, 8)
    gm = surgery.compress(net, [CompressActivations("int8")], x)
    m = surgery.activation_memory(gm, (x,))
    # ReLU's result (4x512 float32) is saved by ReLU and by the second Linear: one storage;
    # x is the caller's batch and the weights are parameters: not counted
    assert m.baseline_bytes == 4 * 512 * 4
    # int8: 2048 codes + 8 groups x (float32 low + float32 step)
    assert m.compressed_bytes == 2048 + 8 * 8
    assert m.regions == ["compressed_model"]
    assert surgery.activation_memory(surgery.compress(net, [CompressActivations("random")], x), (x,)
                                     ).compressed_bytes == 0


def test_passthrough_of_parameters_given_integers_and_constants():
    lin = nn.Linear(4, 4)
    lin.table = torch.arange(6) * 5  # a plain tensor attribute, like a captured graph's constant
    given = torch.arange(10)  # e.g. token ids: the caller holds them anyway
    region = CompressedRegion(lin, make_codec("dct", keep=0.1))
    pack, unpack = region._hooks((torch.randn(2, 4), given))
    const = torch.randn(3, 3)
    view_of_weight = lin.weight.t()
    act = (torch.randn(5, 4, requires_grad=True) * 2)
    for t in (lin.weight, given, given[2:], lin.table, const, view_of_weight):
        assert pack(t).tensor is t and unpack(pack(t)) is t
    packed = pack(act)
    assert not isinstance(packed, torch.Tensor) and unpack(packed).shape == act.shape


@pytest.mark.parametrize("method", ["dct", "random", "int4"])
def test_integers_made_inside_a_region_are_packed_losslessly(method):
    pack, unpack = CompressedRegion(nn.Identity(), make_codec(method))._hooks()
    idx = torch.arange(600).view(3, 200) * 3 - 7  # made inside: packed, whatever the float codec
    mask = torch.arange(50) % 3 == 0
    for t in (idx, idx.int(), mask):
        packed = pack(t)
        assert isinstance(packed, IntPacked) and sum(p.untyped_storage().nbytes() for p in packed_tensors(packed)) \
            < t.numel() * t.element_size() / 2
        back = unpack(packed)
        assert back.dtype == t.dtype and torch.equal(back, t)
    wide = torch.tensor([torch.iinfo(torch.int64).min, 0, torch.iinfo(torch.int64).max])
    assert pack(wide).tensor is wide  # nothing narrower holds it: kept and version-checked
    none_pack, _ = CompressedRegion(nn.Identity(), make_codec("none"))._hooks()
    assert none_pack(idx).tensor is idx  # `none` stays bit-identical to no hooks: the tensor itself


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, ceil_mode=True)], ids=["3s2p1", "2ceil"])
def test_gradients_through_max_pool_under_dct_keep_one(pool, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(8, 4, 3), nn.Flatten(),
                        nn.LazyLinear(5))
    x = torch.randn(2, 3, 23, 19)
    net(x)
    gm = surgery.compress(net, [CompressActivations("dct", keep=1.0)], x)
    unpacked = []
    unpack = IntegerCodec.unpack
    monkeypatch.setattr(IntegerCodec, "unpack", lambda self, p: unpacked.append(p) or unpack(self, p))
    g, ref = _grads(gm, x), _grads(net, x)
    assert (g - ref).abs().max() <= 1e-5
    assert len(unpacked) == 1 and unpacked[0].dtype == torch.int64  # max-pool's indices, packed


class _InPlaceAfterSave(nn.Module):
    def forward(self, a):
        y = a.exp()  # exp saves its result
        return y.add_(1)


def test_inplace_change_of_a_kept_tensor_is_caught_like_autograd_does():
    a = torch.randn(3, requires_grad=True)
    with pytest.raises(SurgeryError, match="modified in place"):
        CompressedRegion(_InPlaceAfterSave(), make_codec("none"))(a * 1).sum().backward()
    # a lossy codec packs at save time, so it keeps the value autograd needs
    CompressedRegion(_InPlaceAfterSave(), make_codec("int8"))(a * 1).sum().backward()


def test_disabled_hooks_are_reported_with_the_region():
    region = CompressedRegion(nn.Linear(3, 3), make_codec("int8"))
    with torch.autograd.graph.disable_saved_tensors_hooks("hooks are off"):
        with pytest.raises(SurgeryError, match=r"CompressedRegion\(int8\).*hooks are off"):
            region(torch.randn(2, 3, requires_grad=True))


def test_activation_memory_leaves_model_state_alone(cnn):
    net, x = cnn
    gm = surgery.compress(net, [CompressActivations("dct", keep=0.1)], x)
    gm.train()
    state = copy.deepcopy(gm.state_dict())
    rng = torch.get_rng_state()
    m = surgery.activation_memory(gm, x)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in gm.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert 0 < m.compressed_bytes < m.baseline_bytes and 0 < m.reduction < 1
    assert all(r.hooks_enabled for r in gm.modules() if isinstance(r, CompressedRegion))


def test_region_selection_forms():
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    gm = surgery.compress(net, [CompressActivations("int8", select="layer1")], x)
    region = gm.compressed_layer1
    assert isinstance(region, CompressedRegion)
    # the whole subtree moves, residual adds included
    assert sum(n.target is torch.ops.aten.add or "add" in n.name for n in region.inner.graph.nodes) == 2
    gm = surgery.compress(net, [CompressActivations("int8", select=nn.Conv2d, exclude="layer4*")], x)
    regions = [n for n, m in gm.named_modules() if isinstance(m, CompressedRegion)]
    assert len(regions) == 15 and "compressed_conv1" in regions
    with pytest.raises(SurgeryError, match="matched no op"):
        CompressActivations(select="nothing_like_this").apply(copy.deepcopy(gm), surgery.Context())
    assert not any(isinstance(m, CompressedRegion) for m in net.modules())  # caller untouched


def test_bad_configuration_is_named():
    with pytest.raises(ConfigError, match="method = 'jpeg': expected one of"):
        CompressActivations("jpeg").codec()
    with pytest.raises(ConfigError, match=r"keep = 0.0: expected a number in \(0, 1\]"):
        CompressActivations("dct", keep=0.0).codec()
    with pytest.raises(ConfigError, match="not orthogonal"):
        CompressActivations("wavelet", wavelet="bior2.2").codec()


def test_nested_regions_keep_the_innermost_codec(cnn):
    net, x = cnn
    inner = surgery.compress(net, [CompressActivations("int8", select="conv2")], x)
    both = surgery.compress(inner, [CompressActivations("dct", keep=0.05)], x)
    outer = both.compressed_model
    assert isinstance(outer.inner.compressed_conv2, CompressedRegion)
    assert outer.inner.compressed_conv2.codec.name == "int8" and outer.codec.name == "dct"
    _grads(both, x)  # runs: the inner region's hooks win inside it
    plain = strip_compression(both)
    assert not any(isinstance(m, CompressedRegion) for m in plain.modules())
    with pytest.raises(SurgeryError, match="compress the inner region first"):
        surgery.compress(both, [CompressActivations("int4", select="conv3")], x)


class _CheckpointInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.b(checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False))


def test_checkpoint_composition():
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    # checkpoint inside a region: checkpoint's hooks win there, the rest is compressed
    body = _CheckpointInside()
    region = CompressedRegion(copy.deepcopy(body), make_codec("threshold", keep=1.0))
    torch.testing.assert_close(_grads(region, x), _grads(body, x), rtol=0, atol=1e-6)
    # a region inside the (default) non-reentrant checkpoint cannot work: it would keep what
    # checkpoint drops
    region = CompressedRegion(nn.Sequential(nn.Linear(16, 16), nn.Tanh()), make_codec("int8"))
    with pytest.raises(SurgeryError, match="non-reentrant torch.utils.checkpoint"):
        checkpoint(region, x, use_reentrant=False)
    # the reentrant variant saves nothing in its forward and recomputes under the region's hooks
    none = CompressedRegion(region.inner, make_codec("none"))
    x.grad = None
    checkpoint(none, x, use_reentrant=True).sum().backward()
    g, x.grad = x.grad, None
    region.inner(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=0, atol=0)


def test_pickle_copy_and_strip(cnn):
    net, x = cnn
    gm = surgery.compress(net, [CompressActivations("wavelet", keep=0.2)], x)
    # (pickling the top-level captured GraphModule is the foundation's business; the region pickles)
    buf = io.BytesIO()
    torch.save(gm.compressed_model, buf)
    buf.seek(0)
    again = copy.deepcopy(gm)
    again.compressed_model = torch.load(buf, weights_only=False)
    plain = strip_compression(gm)
    assert not any(isinstance(m, CompressedRegion) for m in plain.modules())
    assert any(isinstance(m, CompressedRegion) for m in gm.modules())
    gm.eval(), again.eval(), plain.eval(), net.eval()
    with torch.no_grad():
        for m in (again, plain, gm):
            torch.testing.assert_close(m(x), net(x), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_roundtrip_stays_on_device():
    x = torch.randn(2, 8, 20, 20, device="cuda")
    for name in ("threshold", "dct", "wavelet", "int8", "int4"):
        codec = make_codec(name, keep=1.0)
        packed = codec.pack(x)
        assert all(t.is_cuda for t in packed_tensors(packed))
        assert codec.unpack(packed).is_cuda
    _, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    packed = IntegerCodec().pack(idx)
    assert all(t.is_cuda for t in packed_tensors(packed)) and torch.equal(IntegerCodec().unpack(packed), idx)
    sparse = make_codec("dct", keep=0.05).pack(x).coeffs  # the chunk-local index, decoded on the device
    assert sparse.counts is not None and sparse.counts.is_cuda and sparse.index.is_cuda
    assert torch.equal(sparse.positions(), (sparse.dense(x.dtype) != 0).nonzero().squeeze(1))


class _Stages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.Dropout(0.2),
                                    nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_checkpointed_regions_keep_only_their_packed_inputs_and_recompute():
    torch.manual_seed(0)
    net, x = _Stages(), torch.randn(4, 3, 16, 16)

    def grads(model):  # by the caller's names: a region moves stage1.0 to compressed_stage1.inner.stage1.0
        torch.manual_seed(0)
        model.zero_grad()
        model(x).square().mean().backward()
        by_name = {re.sub(r"compressed_\w+\.inner\.", "", n): p.grad.flatten() for n, p in model.named_parameters()}
        return torch.cat([by_name[n] for n, _ in net.named_parameters()]).double()

    ref = grads(net)
    plain = surgery.activation_memory(surgery.compress(net, [CompressActivations("none", select="stage*")], x), (x,))
    bytes_ = {}
    for method in ("none", "int8"):
        gm = surgery.compress(net, [CompressActivations(method, select="stage*", checkpoint=True)], x).train()
        assert all(m.checkpoint for m in gm.modules() if isinstance(m, CompressedRegion))
        g = grads(gm)  # dropout draws the same mask when recomputed: checkpoint restores the RNG state
        if method == "none":
            torch.testing.assert_close(g, ref, rtol=0, atol=1e-6)
        else:
            assert _cos(g, ref) > 0.99
        bytes_[method] = surgery.activation_memory(gm, (x,)).compressed_bytes
    # checkpointing keeps only each stage's input (the stem's output: 4x8x16x16 float32, and
    # stage1's output), int8 packs those to a byte per value plus a low and a step per 256; the
    # head's input (4x16 float32) is saved outside the regions
    stage_inputs, head = 2 * 4 * 8 * 16 * 16, 4 * 16 * 4
    assert bytes_["none"] == 4 * stage_inputs + head < plain.compressed_bytes
    assert bytes_["int8"] == stage_inputs + 8 * (stage_inputs // 256) + head
