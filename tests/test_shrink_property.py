"""Property test: Shrink is exact on random small DAGs of conv/BN/ReLU/add/cat/flatten/linear,
channels-last LayerNorms and RMSNorms (module and decomposed), one norm over a cat (masks over
runs of a group's units), convs making two outputs of each channel (masks with each=2), gated
units (silu(g) * u), single-head and multi-head (grouped-query, eager or SDPA) attention over the
pixels, with random masks (few examples here; benchmarks/shrink_property.py runs hundreds)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import Scale, insert_shared_mask, n_params, randomise_norms
from torch import nn

import surgery
from passes import Shrink
from surgery.channels import channel_groups
from surgery.pipeline import UnitMask
from surgery.verify import max_rel_diff, run_eval


class RandomDag(nn.Module):
    """A random DAG of conv/BN/ReLU/add/cat ending in flatten+linear (or pool+linear), built
    from a spec so that fx traces it into a plain graph."""

    def __init__(self, spec: list[tuple], head: str, hw: int):
        super().__init__()
        self.spec, self.head_kind = spec, head
        self.layers = nn.ModuleDict()
        chans = [3]
        for i, (op, a, b, arg) in enumerate(spec):
            if op == "conv":
                k, out, groups = arg
                self.layers[str(i)] = nn.Conv2d(chans[a], out, k, padding=k // 2, groups=groups)
                chans.append(out)
            elif op == "bn":
                self.layers[str(i)] = nn.BatchNorm2d(chans[a])
                chans.append(chans[a])
            elif op == "relu":
                chans.append(chans[a])
            elif op == "add":
                chans.append(chans[a])
            elif op == "cat":
                chans.append(chans[a] + chans[b])
                if arg:  # one norm over the joined parts: a dense block's group, masked by runs
                    self.layers[str(i)] = nn.LayerNorm(chans[-1])
            elif op in ("ln", "rms"):
                norm = nn.LayerNorm(chans[a]) if op == "ln" else nn.RMSNorm(chans[a], eps=1e-5)
                with torch.no_grad():
                    norm.weight.normal_(1, 0.2)
                    if op == "ln":
                        norm.bias.normal_(0, 0.2)
                self.layers[str(i)] = norm
                chans.append(chans[a])
            elif op in ("rms_decomposed",):
                chans.append(chans[a])
            elif op == "glu":
                self.layers[f"{i}g"], self.layers[f"{i}u"] = nn.Conv2d(chans[a], arg, 1), nn.Conv2d(chans[a], arg, 1)
                chans.append(arg)
            elif op == "attn":  # single-head attention over the pixels: q, k, v 1x1 convs
                for p in "qkv":
                    self.layers[f"{i}{p}"] = nn.Conv2d(chans[a], arg if p != "v" else chans[a], 1)
                chans.append(chans[a])
            elif op == "mha":  # multi-head (grouped-query) attention over the pixels, then o, added
                h, kv, hd, _ = arg
                for p, n in (("q", h), ("k", kv), ("v", kv)):
                    self.layers[f"{i}{p}"] = nn.Conv2d(chans[a], n * hd, 1)
                self.layers[f"{i}o"] = nn.Conv2d(h * hd, chans[a], 1)
                chans.append(chans[a])
        self.last = len(chans) - 1
        feat = chans[-1] * (hw * hw if head == "flatten" else 1)
        self.fc = nn.Linear(feat, 3)

    def forward(self, x):
        ts = [x]
        for i, (op, a, b, arg) in enumerate(self.spec):
            if op in ("conv", "bn"):
                ts.append(self.layers[str(i)](ts[a]))
            elif op == "relu":
                ts.append(torch.relu(ts[a]))
            elif op == "add":
                ts.append(ts[a] + ts[b])
            elif op == "cat":
                ts.append(torch.cat([ts[a], ts[b]], 1))
                if arg:
                    ts[-1] = self.layers[str(i)](ts[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif op in ("ln", "rms"):  # channels-last, as ConvNeXt and transformers normalise
                ts.append(self.layers[str(i)](ts[a].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif op == "rms_decomposed":  # Hugging Face's RMSNorm over the channel axis
                ts.append(ts[a] * torch.rsqrt(ts[a].pow(2).mean(1, keepdim=True) + 1e-5))
            elif op == "glu":
                ts.append(F.silu(self.layers[f"{i}g"](ts[a])) * self.layers[f"{i}u"](ts[a]))
            elif op == "attn":
                q, k, v = (self.layers[f"{i}{p}"](ts[a]).flatten(2).transpose(1, 2) for p in "qkv")
                out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
                ts.append(ts[a] + out.transpose(1, 2).reshape(ts[a].shape))
            elif op == "mha":
                ts.append(ts[a] + self.layers[f"{i}o"](self._mha(i, ts[a], *arg)))
        y = ts[-1]
        y = torch.flatten(y, 1) if self.head_kind == "flatten" else y.mean((2, 3))
        return self.fc(y)


    def _mha(self, i: int, x, h: int, kv: int, hd: int, sdpa: bool):
        B, _, H, W = x.shape
        q, k, v = (self.layers[f"{i}{p}"](x).flatten(2).transpose(1, 2).reshape(B, H * W, -1, hd).transpose(1, 2)
                   for p in "qkv")
        if kv < h:  # Hugging Face's repeat_kv
            k, v = (t[:, :, None].expand(B, kv, h // kv, H * W, hd).reshape(B, h, H * W, hd) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v) if sdpa else torch.softmax(q @ k.transpose(-2, -1), -1) @ v
        return y.transpose(1, 2).reshape(B, H * W, h * hd).transpose(1, 2).reshape(B, h * hd, H, W)


def draw_dag(data, hw: int = 4) -> RandomDag:
    from hypothesis import strategies as st
    chans = [3]
    spec = []
    n = data.draw(st.integers(2, 9), label="n_ops")
    for _ in range(n):
        op = data.draw(st.sampled_from(["conv", "conv", "bn", "relu", "add", "cat", "ln", "rms", "rms_decomposed",
                                        "glu", "attn", "mha"]))
        a = data.draw(st.integers(0, len(chans) - 1))
        if op == "conv":
            k = data.draw(st.sampled_from([1, 3]))
            dw = chans[a] > 3 and data.draw(st.booleans())
            # a depthwise conv, or one making two outputs of each channel (PiT, FastViT: `each` masks)
            out = chans[a] * data.draw(st.sampled_from([1, 2])) if dw else data.draw(st.sampled_from([2, 4, 6, 8]))
            spec.append(("conv", a, None, (k, out, chans[a] if dw else 1)))
            chans.append(out)
        elif op == "add":
            same = [i for i, c in enumerate(chans) if c == chans[a] and i != a]
            if not same:
                continue
            spec.append(("add", a, data.draw(st.sampled_from(same)), None))
            chans.append(chans[a])
        elif op == "cat":
            norm = len(chans) > 2 and data.draw(st.booleans())
            if norm:  # two computed parts, one norm over both (the input's channels stay whole)
                a, b = (data.draw(st.integers(1, len(chans) - 1)) for _ in "ab")
            else:
                b = data.draw(st.integers(0, len(chans) - 1))
            spec.append(("cat", a, b, norm))
            chans.append(chans[a] + chans[b])
        elif op == "bn" and a > 0:
            spec.append(("bn", a, None, None))
            chans.append(chans[a])
        elif op == "relu":
            spec.append(("relu", a, None, None))
            chans.append(chans[a])
        elif op in ("ln", "rms", "rms_decomposed") and a > 0:
            spec.append((op, a, None, None))
            chans.append(chans[a])
        elif op == "mha":
            h = data.draw(st.sampled_from([2, 4]))
            arg = (h, data.draw(st.sampled_from([h, 1, 2])), data.draw(st.sampled_from([1, 2, 3])), data.draw(st.booleans()))
            spec.append((op, a, None, arg))
            chans.append(chans[a])
        elif op in ("glu", "attn"):
            width = data.draw(st.sampled_from([2, 4, 6]))
            spec.append((op, a, None, width))
            chans.append(width if op == "glu" else chans[a])
    if not spec or spec[-1][0] != "conv":
        spec.append(("conv", len(chans) - 1, None, (1, 4, 1)))
    head = data.draw(st.sampled_from(["flatten", "mean"]))
    return randomise_norms(RandomDag(spec, head, hw), seed=data.draw(st.integers(0, 99)))


def random_masks(gm, data) -> None:
    """Shared masks on random groups, plus masks at random conv/BN outputs (before BNs too)."""
    from hypothesis import strategies as st
    for g in channel_groups(gm):
        if not g.mask_points() or not data.draw(st.booleans()):
            continue
        zero = data.draw(st.lists(st.booleans(), min_size=g.size, max_size=g.size))
        soft = data.draw(st.booleans())
        f = torch.tensor([0.0 if z else 1.0 for z in zero])
        if soft:
            f = f * (torch.rand(g.size) * 2 - 0.3)
        insert_shared_mask(gm, g, Scale(f, g.mask_points()[0].dim), f"hm_{g.id}")
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and len(n.meta.get("shape", ())) == 4
             and not isinstance(gm.get_submodule(str(n.target)), UnitMask)]
    for n in data.draw(st.lists(st.sampled_from(nodes), max_size=2, unique=True)) if nodes else []:
        c = n.meta["shape"][1]
        zero = data.draw(st.lists(st.booleans(), min_size=c, max_size=c))
        surgery.graph.insert_after(gm, n, Scale(torch.tensor([0.0 if z else 1.0 for z in zero]), 1), "rm")


def check_random_dag(data) -> None:
    model = draw_dag(data)
    x = torch.randn(2, 3, 4, 4)
    gm = surgery.capture(model, (x,))
    random_masks(gm, data)
    from surgery.shapes import ShapeProp
    ShapeProp(gm).propagate(x)
    small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
    x2 = torch.randn(3, 3, 4, 4)
    assert max_rel_diff(run_eval(gm, (x2,)), run_eval(small, (x2,))) < 1e-4
    assert n_params(small) <= n_params(gm)


def test_random_dags_shrink_exactly():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.data())
    def prop(data):
        check_random_dag(data)

    prop()
