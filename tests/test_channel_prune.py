"""ChannelPrune's options (criteria, scope, rounding, exclusions), the mode of its masks, and its config errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from passes import ChannelPrune
from passes.channel_prune import HardMask
from surgery.verify import max_rel_diff, run_eval

from helpers import masked_and_shrunk, n_params, randomise_norms


@pytest.mark.parametrize("kw", [dict(criterion="l2"), dict(criterion="bn_scale"), dict(criterion="random"),
                                dict(scope="global"), dict(round_to=8), dict(exclude="layer2*")])
def test_channel_prune_options(kw):
    import torchvision
    model = randomise_norms(torchvision.models.resnet18(weights=None, num_classes=10))
    masked, small, x = masked_and_shrunk(model, (1, 3, 32, 32), **kw)
    x2 = torch.randn(1, 3, 32, 32)
    assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-4
    convs = {n: m for n, m in small.named_modules() if isinstance(m, nn.Conv2d)}
    assert small.get_submodule("fc").out_features == 10  # the output is never pruned
    if kw.get("round_to") == 8:
        assert all(m.out_channels % 8 == 0 for m in convs.values())
    if "exclude" in kw:
        assert small.get_submodule("layer2.0.conv1").out_channels == 128
        assert small.get_submodule("layer3.0.conv1").out_channels == 128
    assert all(m.out_channels >= 1 for m in convs.values())
    assert n_params(small) < n_params(model)


@pytest.mark.parametrize("training", [False, True])
def test_channel_prune_masks_take_the_models_mode(training):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).train(training)
    masked = surgery.compress(net, [ChannelPrune(ratio=0.5)], (torch.randn(1, 3, 8, 8),))
    masks = [m for m in masked.modules() if isinstance(m, HardMask)]
    assert len(masks) == 1 and masks[0].training is training and masked.training is training


def test_channel_prune_rejects_bad_config():
    with pytest.raises(surgery.SurgeryError, match="ratio"):
        ChannelPrune(ratio=1.0)
    with pytest.raises(surgery.SurgeryError, match="criterion"):
        ChannelPrune(criterion="fisher")
