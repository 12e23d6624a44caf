"""The standard channel rules, one file per family; importing this package registers them all
in the rule book (:data:`surgery.channels.RULES`).

- :mod:`.modules`: torch.nn layers and surgery's masks (conv, linear, norms, activations, pooling), and an
  Embedding's table read whole as activations (DeBERTa's relative positions, DETR's object queries)
- :mod:`.elementwise`: arithmetic with broadcasting (add, mul, addcmul, where), activations, casts, dropout
- :mod:`.tensor`: cat/split/getitem, reshapes and permutes, expand, size reads
- :mod:`.copies`: repeat, gather, zeros_like and its kin
- :mod:`.functional`: reductions, softmax, functions without weights (pad, pooling), stochastic depth
- :mod:`.layers`: the functional forms of layers with weights (F.linear, F.conv2d, F.layer_norm...)
- :mod:`.attention`: matmul (heads as channels) and scaled_dot_product_attention
- :mod:`.shifts`: roll and flip
- :mod:`.libraries`: library layers with a forward of their own (timm's BatchNormAct2d, Conv2dSame...)
- :mod:`.common`: the pieces several families share (rule files import it, never each other)
"""
from . import (attention, copies, elementwise, functional, layers, libraries, modules, shifts,  # noqa: F401
               tensor)  # each registers its rules
