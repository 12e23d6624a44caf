"""torch.save / torch.load of what surgery returns: captured graphs pickle their graph, not code
that fx would have to trace again (which a graph captured with concrete values does not survive)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

import surgery
from passes import ChannelPrune, Shrink
from surgery.copying import copy_module
from surgery.pickling import CapturedGraphModule
from surgery.verify import run_eval

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _reloaded(module: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # our own file: it holds code


def test_a_shrunk_hugging_face_model_survives_torch_save_and_load():
    pytest.importorskip("transformers")
    from _hf_models import build_hf, output_tensors
    model, x = build_hf("bert")
    small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink()], x)
    small.eval()
    back = _reloaded(small)  # fx's own pickling traced the code again: "slice indices must be integers"
    assert isinstance(back, fx.GraphModule) and type(back).__name__ == type(small).__name__
    assert not back.training
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in small.parameters())
    assert [n.format_node() for n in back.graph.nodes] == [n.format_node() for n in small.graph.nodes]
    for a, b in zip(output_tensors(run_eval(small, x)), output_tensors(run_eval(back, x))):
        assert torch.equal(a, b)
    again = surgery.compress(back, [ChannelPrune(ratio=0.5), Shrink()], x)  # and it can be operated on again
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in back.parameters())


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        # F.max_pool2d is a local function (torch's boolean dispatch): pickled by the name the code gives it
        return self.fc(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_copies_of_a_captured_module_pickle_their_graph_too():
    x = (torch.randn(2, 3, 8, 8),)
    gm = copy_module(surgery.capture(Pooled().eval(), x))
    assert isinstance(gm, CapturedGraphModule)  # a copy keeps the class, and with it the pickling
    back = _reloaded(gm)
    assert torch.equal(run_eval(back, x), run_eval(gm, x))
    assert back.graph is not gm.graph and back.graph.owning_module is back
    assert F.max_pool2d in [n.target for n in back.graph.nodes]
