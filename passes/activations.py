"""CompressActivations: cut training memory by compressing what autograd saves for backward.

The pass moves each selected region of a captured model into a child module,
:class:`CompressedRegion`, whose forward runs under ``torch.autograd.graph.saved_tensors_hooks``:
every floating-point activation saved for backward inside the region is packed by a codec
(:mod:`passes.codecs`) and unpacked when backward needs it. The forward pass is unchanged; only
the gradients see the compressed activations.

Which tensors are packed: floating-point tensors that require grad and are not parameters,
buffers or views of them go through the codec. Integer and bool tensors made inside the region
(max-pool's int64 indices) are packed losslessly by :class:`~passes.packing.IntegerCodec` under
every method but ``none``: narrowed, delta-coded or bit-packed, they come back bit for bit.
Tensors without ``requires_grad`` (the input batch, BatchNorm's saved statistics), parameters,
buffers and constants of the region, and integer tensors the region was given (token ids,
targets: the caller holds them anyway) pass through untouched. A tensor saved twice in one
forward (a ReLU output that ReLU and the next conv both save) is packed once.

Regions (``select``/``exclude`` take the usual selector forms):

- ``select=None``: the whole model is one region;
- a selector matching a container (``"layer1"``, ``"BasicBlock"``): each outermost matched
  module's whole subtree, including its functional ops (residual adds), is one region;
- a selector matching leaf ops (``nn.Conv2d``): each matched op is its own region.

Composition rules (PyTorch keeps only the innermost pair of saved-tensor hooks):

- Nested compression: a region inside another region keeps its own codec; the outer codec
  applies only to what is saved outside the inner region. Applying the pass twice over
  overlapping selections is therefore allowed and means "the innermost method wins".
- ``CompressActivations(..., checkpoint=True)`` combines the two: each region runs under
  ``torch.utils.checkpoint`` inside its own hooks, so it keeps only its input, packed by the
  codec, and is recomputed in backward from the unpacked input.
- ``torch.utils.checkpoint`` inside a region: checkpoint's own hooks are innermost, so the
  checkpointed ops save nothing and are recomputed as usual; the codec sees only what is saved
  outside the checkpointed function (for the reentrant variant, its inputs).
- A region inside a non-reentrant ``torch.utils.checkpoint`` (the default variant): the region's
  hooks would be innermost during the checkpointed forward, so its activations would be packed
  and kept instead of being dropped and recomputed: checkpointing would silently stop working
  there. The region raises :class:`~surgery.errors.SurgeryError` instead. Use the reentrant
  variant (``use_reentrant=True``, whose forward saves nothing) or checkpoint outside regions.
- Under ``torch.autograd.graph.disable_saved_tensors_hooks`` (torch.compile, functorch), the
  region raises a SurgeryError naming itself.
- With ``torch.no_grad()``/``inference_mode`` nothing is saved, so regions cost nothing.
- Autograd does not check the version of hook-packed tensors. Codecs copy at save time and so
  keep the value backward needs; tensors kept as they are (``none``, pass-through, an integer
  tensor nothing narrower holds) are version-checked by the region, which raises a SurgeryError
  like autograd's in-place error.
- ``torch.autograd.graph.save_on_cpu`` (or any hooks) around the model applies outside the
  regions only. ``torch.compile``/TorchScript do not run Python hooks: ``strip_compression`` first.

Example::

    >>> import torch, torchvision, surgery
    >>> from passes import CompressActivations
    >>> net = torchvision.models.resnet18(weights=None)
    >>> x = torch.randn(2, 3, 64, 64)
    >>> gm = surgery.compress(net, [CompressActivations("dct", select="layer*", keep=0.05)], x)
    >>> m = surgery.activation_memory(gm, (x,))
    >>> m.compressed_bytes < m.baseline_bytes
    True
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from surgery.activations.memory import saved_tensors_hooks
from surgery.copying import copy_module, storage_key
from surgery.errors import SelectionError, SurgeryError
from surgery.graph import extract, finish
from surgery.pipeline import Context
from surgery.select import Selector, describe, matches, select_modules

from . import _fields as check
from .codecs import METHODS, NoCodec, check_group_size, check_keep, check_wavelet, make_codec
from .packing import IntegerCodec, IntPacked

__all__ = ["CompressActivations", "CompressedRegion", "strip_compression", "METHODS"]


def _in_checkpoint() -> bool:
    """True inside the forward of a non-reentrant torch.utils.checkpoint (its pack hook is the
    innermost one)."""
    try:  # a private API: if a future torch drops it, the guard turns off rather than break
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    except (AttributeError, RuntimeError):
        return False
    if hooks is None:
        return False
    pack = hooks[0]
    return getattr(pack, "__module__", "") == "torch.utils.checkpoint" and \
        "_checkpoint_hook" in getattr(pack, "__qualname__", "")


def _tensors_outside(module: nn.Module) -> list[Tensor]:
    """The tensors `module` holds: parameters, buffers and plain tensor attributes (a captured
    graph's constants). They live through the step whatever autograd saves."""
    held = [*module.parameters(), *module.buffers()]
    held += [v for m in module.modules() for v in vars(m).values() if isinstance(v, Tensor)]
    return held


@dataclass
class _Kept:
    """A tensor kept as it is (pass-through, or the `none` method), with the version it had when
    saved: autograd checks that version for its own saved tensors but not for hook-packed ones."""

    tensor: Tensor
    version: int


class CompressedRegion(nn.Module):
    """Runs `inner` with its saved activations packed by `codec` (a :mod:`passes.codecs` codec).

    Implements the :class:`surgery.activations.memory.HookedRegion` protocol: set ``hooks_enabled = False``
    to run `inner` plainly.
    """

    checkpoint: bool = False  # (the class default: regions pickled before the option load as before)

    def __init__(self, inner: nn.Module, codec: Any, checkpoint: bool = False):
        super().__init__()
        self.inner = inner
        self.codec = codec
        self.checkpoint = checkpoint
        self.hooks_enabled = True

    def forward(self, *args: Any) -> Any:
        if not (self.hooks_enabled and torch.is_grad_enabled()):
            return self.inner(*args)
        if _in_checkpoint():
            raise SurgeryError(
                f"CompressedRegion({self.codec.name}) runs inside a non-reentrant torch.utils.checkpoint: "
                "its hooks would override checkpoint's and keep the activations checkpoint is meant to drop. "
                "Checkpoint with use_reentrant=True, or put the checkpoint outside the compressed region.")
        pack, unpack = self._hooks(args)
        try:
            ctx = saved_tensors_hooks(pack, unpack)
            ctx.__enter__()
        except RuntimeError as e:  # disable_saved_tensors_hooks is active (torch.compile, functorch)
            raise SurgeryError(f"CompressedRegion({self.codec.name}): saved-tensor hooks are disabled here "
                               f"({e}); strip_compression(model) before compiling or transforming it") from e
        try:
            return self._checkpointed(args) if self.checkpoint else self.inner(*args)
        finally:
            ctx.__exit__(None, None, None)

    def _checkpointed(self, args: tuple) -> Any:
        """`inner` under torch.utils.checkpoint, inside this region's hooks. The reentrant variant
        runs the forward without grad and saves only its inputs, through these hooks: the
        boundary is packed by the codec, and backward recomputes the region (outside the hooks)
        from the unpacked input. It gives parameters no gradient unless an input requires grad;
        without one (the first region, fed the batch) the non-reentrant variant recomputes alike,
        and its boundary is the caller's input, which no codec packs anyway."""
        from torch.utils.checkpoint import checkpoint
        reentrant = any(isinstance(a, Tensor) and a.requires_grad for a in tree_flatten(args)[0])
        return checkpoint(self.inner, *args, use_reentrant=reentrant)

    def _hooks(self, inputs: tuple = ()):
        codec, exact = self.codec, IntegerCodec()
        fixed = {storage_key(t) for t in _tensors_outside(self.inner)}
        # integer tensors the caller holds anyway (ids, targets): a packed copy would only add bytes
        given = {storage_key(t) for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)}
        # id(tensor) -> (weakref, version, packed): one pack per tensor saved several times; the
        # weakref guards against a freed tensor's id being reused, the version against in-place edits
        cache: dict[int, tuple[Any, int, Any]] = {}

        keep_as_is = isinstance(codec, NoCodec)
        where = type(self).__name__ + f"({codec.name})"

        def kept(t: Tensor, integer: bool) -> bool:
            ptr = storage_key(t)
            if keep_as_is or t.numel() == 0 or ptr in fixed:
                return True
            if integer:
                return ptr in given
            return not (t.is_floating_point() and t.requires_grad) or t.is_leaf

        def pack(t: Tensor) -> Any:
            integer = not (t.is_floating_point() or t.is_complex())  # integer or bool
            if kept(t, integer):
                return _Kept(t, t._version)
            hit = cache.get(id(t))
            if hit is not None and hit[0]() is t and hit[1] == t._version:
                return hit[2]
            with torch.no_grad():
                packed = (exact if integer else codec).pack(t.detach())
            if isinstance(packed, Tensor):  # an integer tensor nothing narrower holds
                packed = _Kept(t, t._version)
            cache[id(t)] = (weakref.ref(t), t._version, packed)
            return packed

        def unpack(p: Any) -> Tensor:
            if isinstance(p, _Kept):
                if p.tensor._version != p.version:
                    raise SurgeryError(
                        f"{where}: a tensor of shape {tuple(p.tensor.shape)} saved for backward was modified "
                        f"in place afterwards (version {p.tensor._version}, saved at {p.version}); autograd "
                        "would raise here too: avoid the in-place op or clone before it")
                return p.tensor
            return exact.unpack(p) if isinstance(p, IntPacked) else codec.unpack(p)

        return pack, unpack

    def extra_repr(self) -> str:
        return f"codec={self.codec!r}, checkpoint={self.checkpoint}, hooks_enabled={self.hooks_enabled}"


def _module_paths(node: fx.Node) -> list[str]:
    """The module paths a node runs inside, outermost first (its own module last)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and (not paths or paths[-1] != node.target):
        paths.append(str(node.target))
    return paths


@dataclass
class CompressActivations:
    """Compress the activations saved for backward in the selected regions.

    Args:
        method: one of ``none``, ``random``, ``threshold``, ``dct``, ``wavelet``, ``int8``, ``int4``.
        select: which regions (see the module docstring); None means the whole model.
        exclude: modules left out (their ops are not put in a region).
        keep: fraction of values (threshold) or coefficients (dct, wavelet) kept.
        block: DCT tile size.
        wavelet: the DWT's pywavelets filter bank.
        level: the DWT's depth.
        group_size: values per int8/int4 quantization group.
        stochastic: stochastic rounding for int8/int4.
        checkpoint: run each region under ``torch.utils.checkpoint``: it keeps only its input,
            packed by the codec, and is recomputed in backward (checkpointing with compressed
            boundaries). Select several regions (``select="layer*"``, one per transformer
            block): with the whole model as one region, backward recomputes all of it.
        exact: threshold, dct and wavelet keep exactly ceil(keep * numel) values by a global top-k
            (n log k) instead of a sampled magnitude threshold (linear time, within 10% of it):
            for experiments that need the exact budget.
    """

    method: str = "dct"
    select: Selector = None
    exclude: Selector = None
    keep: float = 0.05
    block: int = 8
    wavelet: str = "db3"
    level: int = 3
    group_size: int = 256
    stochastic: bool = False
    checkpoint: bool = False
    exact: bool = False
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("compressed_*", CompressedRegion)

    def __post_init__(self) -> None:
        own = "CompressActivations"
        check.choice(own, "method", self.method, METHODS)
        check.selector(own, "select", self.select, empty_ok=False)  # None: the whole model
        check.selector(own, "exclude", self.exclude)
        # every codec option is checked, not only the chosen method's: a bad value is a mistake
        # even where this method ignores it, and switching method must not surface it later
        check_keep(own, self.keep)
        check.number(own, "block", self.block, lo=1, integer=True)
        check_wavelet(own, self.wavelet)
        check.number(own, "level", self.level, lo=1, integer=True)
        check_group_size(own, self.group_size)
        check.flag(own, "stochastic", self.stochastic)
        check.flag(own, "checkpoint", self.checkpoint)
        check.flag(own, "exact", self.exact)

    def codec(self):
        return make_codec(self.method, self.keep, self.block, self.wavelet, self.level, self.group_size,
                          self.stochastic, self.exact)

    def regions(self, gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
        """Region name -> its nodes, in graph order."""
        groups: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            paths = _module_paths(node)
            if any(self._hit(gm, p, self.exclude) for p in paths):
                continue
            if self.select is None:
                key = ""
            else:
                key = next((p for p in paths if self._hit(gm, p, self.select)), None)
                if key is None:
                    continue
            groups.setdefault(key, []).append(node)
        return groups

    @staticmethod
    def _hit(gm: fx.GraphModule, path: str, sel: Selector) -> bool:
        if sel is None:
            return False
        try:
            module = gm.get_submodule(path)
        except AttributeError:
            return False
        return matches(path, module, sel)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        codec = self.codec()
        groups = self.regions(gm)
        if not groups:
            raise SelectionError(*_nothing_selected(self, gm))
        for key, nodes in groups.items():
            name = "compressed_" + (key or "model")
            try:
                extract(gm, nodes, name, wrap=lambda child: CompressedRegion(child, codec, self.checkpoint))
            except SurgeryError as e:
                raise SurgeryError(f"CompressActivations: cannot make region {key or '<whole model>'!r} "
                                   f"a child module: {e}") from e
        return gm


def _nothing_selected(p: CompressActivations, gm: fx.GraphModule) -> tuple[str, list[str]]:
    """Why no op of `gm` fell in a region, and the nearest module names (from surgery.select)."""
    exclude = describe(p.exclude) if p.exclude is not None else "nothing"
    msg = (f"CompressActivations: select={describe(p.select)} (exclude={exclude}) matched no op in "
           f"the graph of {type(gm).__name__}")
    inside = [n for n, m in gm.named_modules() if isinstance(m, CompressedRegion)]
    if inside:
        return (msg + f"; ops already inside a CompressedRegion ({', '.join(inside[:4])}) are not selected "
                "again: to nest, compress the inner region first (the innermost hooks win)"), []
    try:
        modules = select_modules(gm, p.select, p.exclude)
    except SelectionError as e:  # nothing by that name or type at all
        return msg, e.nearest
    return msg + f"; the modules it matches run no op of the graph: {', '.join(list(modules)[:8])}", []


def strip_compression(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with every CompressedRegion replaced by its plain inner module (for export,
    torch.compile or scripting, none of which run Python saved-tensor hooks)."""
    out = copy_module(gm)
    while True:  # outermost first; names below a replaced region change, so look again
        name = next((n for n, m in out.named_modules() if isinstance(m, CompressedRegion)), None)
        if name is None:
            break
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, out.get_submodule(name).inner)
    return finish(out) if isinstance(out, fx.GraphModule) else out
