import re

import pytest
import torchvision.models as tvm
from torch import nn

import surgery
from surgery import SelectionError
from surgery.select import select_modules, select_nodes


@pytest.fixture(scope="module")
def resnet():
    return tvm.resnet18(weights=None)


def test_select_by_type(resnet):
    picked = select_modules(resnet, nn.Linear)
    assert list(picked) == ["fc"]
    convs = select_modules(resnet, (nn.Conv2d,))
    assert len(convs) == 20


def test_select_by_class_name(resnet):
    assert list(select_modules(resnet, "Linear")) == ["fc"]
    assert len(select_modules(resnet, "BatchNorm2d")) == 20


def test_select_by_glob(resnet):
    assert list(select_modules(resnet, "layer*.0.conv2")) == [f"layer{i}.0.conv2" for i in range(1, 5)]
    assert list(select_modules(resnet, "layer1.?.conv1")) == ["layer1.0.conv1", "layer1.1.conv1"]


def test_select_by_regex(resnet):
    picked = select_modules(resnet, re.compile(r"^layer[12]\.1\.bn\d$"))
    assert list(picked) == ["layer1.1.bn1", "layer1.1.bn2", "layer2.1.bn1", "layer2.1.bn2"]


def test_select_by_callable(resnet):
    picked = select_modules(resnet, lambda name, m: isinstance(m, nn.Conv2d) and m.out_channels == 512)
    assert list(picked) == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0",
                            "layer4.1.conv1", "layer4.1.conv2"]


def test_exclude_wins_over_select(resnet):
    picked = select_modules(resnet, nn.Conv2d, exclude=["conv1", "*.downsample.*", re.compile("layer4")])
    assert "conv1" not in picked and not any("downsample" in n or "layer4" in n for n in picked)
    assert len(picked) == 12


def test_mixed_selector_list(resnet):
    picked = select_modules(resnet, [nn.Linear, "layer4.1.conv2"])
    assert list(picked) == ["layer4.1.conv2", "fc"]


def test_nothing_matched_lists_nearest_names(resnet):
    with pytest.raises(SelectionError) as info:
        select_modules(resnet, "layer5.0.conv1")
    msg = str(info.value)
    assert "matched no module" in msg and "nearest names" in msg and "layer4.0.conv1" in msg
    assert "layer4.0.conv1" in info.value.nearest


def test_nearest_names_for_a_misspelled_class(resnet):
    with pytest.raises(SelectionError) as info:
        select_modules(resnet, "Conv2D")
    assert "Conv2d" in info.value.nearest


def test_bad_selector_kind_is_named():
    with pytest.raises(SelectionError, match="got 3"):
        select_modules(nn.Linear(2, 2), 3)


def test_select_nodes_in_graph_order_and_hidden_modules():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) if x.sum() > 0 else x

    net = nn.Sequential(nn.Linear(4, 4), Opaque(), nn.Linear(4, 4))
    with pytest.warns(UserWarning):
        gm = surgery.capture(net)
    assert [n.target for n in select_nodes(gm, nn.Linear)] == ["0", "2"]
    with pytest.raises(SelectionError, match="not graph nodes.*1.inner"):
        select_nodes(gm, "1.inner")
