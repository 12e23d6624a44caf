"""Where one shared mask realises a channel group: after each producer and the chain of
channel-local ops that ends it (its BatchNorm, activation, dropout), as far as that chain is the
producer's only reader. See :meth:`surgery.channels.ChannelGroup.mask_points`.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph import submodule
from ..pipeline import UnitMask

__all__ = ["data_users", "is_trailing", "adds_parameter"]

_ADD = frozenset({operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub",
                  "add_", "sub_", "__add__", "__radd__"})


def adds_parameter(node: fx.Node) -> bool:
    """Whether `node` adds to (or subtracts from) channels a tensor of the model's (its channel
    rule recorded the parameter): the sum is not zero where the channels were."""
    return node.op in ("call_function", "call_method") and node.target in _ADD


_METADATA = frozenset({"ndim", "shape", "dtype", "device"})


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values: ``x.ndim``, ``x.shape`` and ``x.dim()`` (timm's
    ``_assert(x.ndim == 4)``) do not, and a mask after `node` leaves them as they were."""
    return [u for u in node.users
            if not (u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _METADATA
                    or u.op == "call_method" and u.target in ("dim", "size"))]


def is_trailing(user: fx.Node, node: fx.Node) -> bool:
    """A channel-local op (BN, activation, dropout) of one input besides the model's own tensors
    (F.batch_norm's statistics) that ends a producer's chain."""
    if [a for a in user.all_input_nodes if a.op != "get_attr"] != [node]:
        return False
    if user.op == "call_function":
        return user.target in _TRAILING_FUNCTIONS
    if user.op == "call_method":
        return user.target in ("relu", "sigmoid", "tanh", "relu_", "sigmoid_")
    if user.op != "call_module":
        return False
    m = submodule(user.graph.owning_module, str(user.target))
    return isinstance(m, _TRAILING) and not isinstance(m, UnitMask)


_TRAILING = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
             nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish,
             nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_TRAILING_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
                       F.hardsigmoid, F.sigmoid, F.leaky_relu, F.elu, F.dropout, F.batch_norm}
