"""Shrink into the user's own classes: ``Shrink(into="modules")``.

The graph form (a GraphModule) is what Shrink edits and verifies first. Capture keeps the
model's own module tree beside the graph (``gm.meta["surgery"]["source"]``, sharing every
layer object with it), so the same edits are one step from the user's classes: every layer the
graph calls is put back at its qualified name (Shrink edits layers in place, sizes included:
``in_features``, ``out_channels``, ``num_features``, ``normalized_shape``, ``groups``), and every
tensor the graph reads directly (a norm's weight inside a traced-through module, a class token)
replaces the tensor at the same name.

Head counts no forward reads (BERT's ``num_attention_heads`` and ``all_head_size``, whose views say
``-1`` heads) are read back from the attention's projections, so that the module states the heads
that are left, as HF's own ``prune_heads`` does; where the forward then fails (it derives its head
size from the count), the counts go back to what they were.

What the graph form can do and the user's classes cannot: rewrite a size written in the
forward's code (``view(B, T, 12, 64)``, or ``self.num_heads`` read at run time), keep a mask's
leftover per-channel scale as its own op. The model is therefore run on the example inputs and
compared with the masked model, as the graph form is; where it fails or differs, a
:class:`~surgery.errors.SurgeryError` names the module (and the line of its forward that
failed) and points at the graph form. A model that differs is never returned. A Hugging Face
model's config is brought in line with the pruned widths where they are uniform across layers
(:mod:`surgery.shrink.hf_config`), so that ``save_pretrained``/``from_pretrained`` round-trip it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from ..calling import call
from ..capture import surgery_meta
from ..codelines import failing_line
from ..errors import SurgeryError, first_line, warn
from ..graph import submodule
from ..verify import eval_mode, max_rel_diff
from .hf_config import fit_config, is_hf_model
from .module_norms import module_path, norm_sites, rescale_norms
from .pruning_plan import PLAN_FIELD, attributes, config_fields, owner_of, plan_of, shapes

__all__ = ["into_modules", "Before", "INTO"]

INTO = ("graph", "modules")
_GRAPH_FORM = "use Shrink() (the graph form), which rewrites such sizes in the graph"


def _put_module(root: nn.Module, target: str, new: nn.Module) -> None:
    owner, name = owner_of(root, target)
    old = None if owner is None else owner._modules.get(name)
    if old is new:
        return
    if old is None or type(old) is not type(new):
        what = "no module" if old is None else f"a {type(old).__name__}"
        raise SurgeryError(f"Shrink(into='modules'): the graph calls {type(new).__name__} {target!r} where the "
                           f"model's own tree has {what}; {_GRAPH_FORM}")
    owner._modules[name] = new


def _put_tensor(root: nn.Module, target: str, new: torch.Tensor) -> None:
    owner, name = owner_of(root, target)
    if owner is None or (name not in owner._parameters and name not in owner._buffers):
        raise SurgeryError(f"Shrink(into='modules'): the shrunk graph reads a tensor {target!r} that the model's "
                           "own classes do not hold: a mask's per-channel scale, kept where its channels could "
                           "not go and its factors could not fold into a layer (the report says why), or a "
                           "constant Shrink folded; ChannelPrune(normalised=False) leaves the groups split "
                           f"across producers, where such scales arise; {_GRAPH_FORM}")
    if name in owner._parameters:
        old = owner._parameters[name]
        if new is not old:
            owner._parameters[name] = new if isinstance(new, nn.Parameter) else nn.Parameter(
                new, requires_grad=old is None or old.requires_grad)
    else:
        owner._buffers[name] = new


def _transfer(work: fx.GraphModule, model: nn.Module) -> None:
    for k in [k for k in vars(model) if k.startswith("_tensor_constant")]:
        delattr(model, k)  # fx's tracer left its tensor constants on the traced root
    for node in work.graph.nodes:
        if node.op == "call_module":
            _put_module(model, str(node.target), submodule(work, str(node.target)))
        elif node.op == "get_attr":
            owner, name = owner_of(work, str(node.target))
            if name.startswith("_tensor_constant"):
                continue  # a tensor the forward makes (fx keeps it as a constant): the model makes it again
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor):
                _put_tensor(model, str(node.target), value)


# int attributes that may describe a size (num_heads, head_dim, all_head_size, split_size, embed_dim,
# inner_dim, n_heads): read at run time by a forward in place of the literal the graph rewrote
_SIZE_NAME = re.compile(r"head|dim|size|width|embed|features|channels|inner")
_NOT_SIZE = re.compile(r"idx|index|layer|_id$|^id$|max_|position|vocab|window|bucket|seed")


def _ints(n: fx.Node) -> list[int]:
    """The int arguments of `n`, in order (view sizes, split sizes)."""
    return [a for a in pytree.tree_leaves((n.args, n.kwargs)) if type(a) is int]


@dataclass
class Before:
    """What :func:`into_modules` compares with after Shrink's edits: the int arguments of every
    call in the graph (view sizes, split sizes), in order, the size of each split by one size
    (Shrink may rewrite it to a list of sizes), the model's tensor shapes, and the norms Shrink may
    rewrite (:func:`~surgery.shrink.module_norms.norm_sites`)."""

    literals: dict[fx.Node, list[int]]
    shapes: dict[str, tuple[int, ...]]
    norms: dict[fx.Node, tuple[str, str]]
    names: dict[int, list[str]]  # id(tensor) -> its qualified names (tied tensors have several)
    attributes: dict[str, dict[str, Any]]
    config: dict[str, Any]
    splits: dict[fx.Node, int]

    @classmethod
    def of(cls, work: fx.GraphModule) -> Before:
        calls = [n for n in work.graph.nodes if n.op in ("call_method", "call_function")]
        literals = {n: ints for n in calls if (ints := _ints(n))}
        splits = {n: n.args[1] for n in calls if len(n.args) > 1 and type(n.args[1]) is int
                  and (n.target if n.op == "call_method" else getattr(n.target, "__name__", "")) == "split"}
        source = getattr(surgery_meta(work).get("source"), "module", None)
        if not isinstance(source, nn.Module):
            return cls(literals, {}, norm_sites(work), {}, {}, {}, splits)
        tensors = source.state_dict(keep_vars=True)
        names: dict[int, list[str]] = {}
        for k, v in tensors.items():
            names.setdefault(id(v), []).append(k)
        return cls(literals, shapes(source), norm_sites(work), names, attributes(source), config_fields(source),
                   splits)


def resized_literals(before: dict[fx.Node, list[int]], splits: dict[fx.Node, int]) -> dict[str, dict[int, int]]:
    """Module path -> {old: new} for the int arguments Shrink rewrote (nodes still in their graph,
    by the innermost module whose forward made them). An old size rewritten to two new ones in
    the same module is ambiguous and left out."""
    out: dict[str, dict[int, int]] = {}
    clash: set[tuple[str, int]] = set()
    for n, old in before.items():
        if n.graph is None or n._erased:
            continue
        new = _ints(n)
        pairs = zip(old, new) if len(new) == len(old) else _split_size(n, splits.get(n))
        path = module_path(n)
        for a, b in pairs:
            if a != b:
                seen = out.setdefault(path, {})
                if seen.setdefault(a, b) != b:
                    clash.add((path, a))
    for path, a in clash:
        out[path].pop(a, None)
    return out


def _split_size(n: fx.Node, size: int | None) -> list[tuple[int, int]]:
    """A ``split(size, dim)`` that Shrink rewrote to ``split([sizes], dim)``: (old size, new size)
    when the new pieces are what a split by one size gives (all equal but a shorter last one), so
    that the forward's ``self.split_size`` (GPT-2's fused qkv) takes the new size. Otherwise none
    (a ``chunk(3)`` rewritten the same way keeps its count)."""
    if n.target is not torch.split or size is None or len(n.args) < 2:
        return []
    sizes = n.args[1]
    if not isinstance(sizes, (list, tuple)) or not sizes or not all(type(v) is int for v in sizes):
        return []
    if any(v != sizes[0] for v in sizes[:-1]) or not 0 < sizes[-1] <= sizes[0]:
        return []
    return [(size, sizes[0])]


def _resize_attributes(model: nn.Module, resized: dict[str, dict[int, int]]) -> None:
    """Size attributes of the modules whose forward wrote a rewritten literal (``self.num_heads``
    in ``view(B, T, self.num_heads, self.head_dim)``): the innermost module on the path with such
    an attribute of the old value takes the new one."""
    for path, sizes in resized.items():
        parts = path.split(".") if path else []
        for i in range(len(parts), -1, -1):
            try:
                m = model.get_submodule(".".join(parts[:i]))
            except AttributeError:
                continue
            hits = {k: sizes[v] for k, v in vars(m).items() if type(v) is int and v in sizes
                    and _SIZE_NAME.search(k.lower()) and not _NOT_SIZE.search(k.lower())}
            if hits:
                for k, v in hits.items():
                    setattr(m, k, v)
                break


_HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "num_key_value_heads")
_HEAD_DIMS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_HEAD_PRODUCTS = ("all_head_size", "inner_dim")


def _widths(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(out, in) of a projection whose weight has `shape`: an nn.Linear, or transformers' Conv1D
    (weight stored (in, out))."""
    if len(shape) != 2:
        return None
    if isinstance(m, nn.Linear):
        return shape[0], shape[1]
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
        return shape[1], shape[0]
    return None


def _resize_head_counts(model: nn.Module, before: Before) -> dict[tuple[str, str], int]:
    """Head counts that no forward reads (BERT's ``num_attention_heads`` and ``all_head_size``, when its
    views say ``-1`` heads) but that describe the module, and HF's own ``prune_heads`` keeps up to
    date: read back from the attention's projections. A module with a head count H and a head size
    D whose direct projections had H*D outputs (q, k, v) or inputs (the output projection) takes
    H' = W / D where all of those that changed now have W; ``all_head_size``/``inner_dim`` of H*D
    take W. Returns the old values of what changed, by (module path, attribute)."""
    changed: dict[tuple[str, str], int] = {}
    for path, m in model.named_modules():
        was = before.attributes.get(path, {})
        dim_name = next((k for k in _HEAD_DIMS if type(getattr(m, k, None)) is int), None)
        if dim_name is None or type(was.get(dim_name)) is not int:
            continue
        d, d0 = getattr(m, dim_name), was[dim_name]
        for heads in _HEAD_COUNTS:
            h0 = was.get(heads)
            if type(h0) is not int or type(getattr(m, heads, None)) is not int:
                continue
            now: set[int] = set()
            for child_name, child in m.named_children():
                weight = child._parameters.get("weight")
                old = before.shapes.get(f"{path}.{child_name}.weight" if path else f"{child_name}.weight")
                widths = _widths(child, tuple(weight.shape) if weight is not None else ())
                old_widths = _widths(child, old or ())
                if widths is None or old_widths is None:
                    continue
                now |= {w for w, w0 in zip(widths, old_widths) if w0 == h0 * d0 and w != w0}
            if len(now) != 1 or next(iter(now)) % d:
                continue
            width = next(iter(now))  # (a count or product the literals already resized is left as it is)
            updates = {k: width for k in _HEAD_PRODUCTS if was.get(k) == h0 * d0 and getattr(m, k, None) == h0 * d0}
            if getattr(m, heads) == h0:
                updates[heads] = width // d
            for k, v in updates.items():
                changed[(path, k)] = getattr(m, k)
                setattr(m, k, v)
    return changed


def _sync_sizes(model: nn.Module) -> None:
    """Size attributes of torch.nn layers (and their subclasses, which the graph may have traced
    through, e.g. timm's LayerNorm2d) read back from their tensors."""
    for m in model.modules():
        w = m._parameters.get("weight")
        if isinstance(m, nn.Linear) and w is not None:
            m.out_features, m.in_features = w.shape
        elif isinstance(m, nn.modules.conv._ConvNd) and w is not None:
            old_in = m.in_channels
            per_group_in = w.shape[0] if m.transposed else w.shape[1]
            out = w.shape[1] * m.groups if m.transposed else w.shape[0]
            if m.groups > 1 and m.groups == old_in == m.out_channels:  # depthwise stays depthwise
                m.groups = out
            m.in_channels, m.out_channels = per_group_in * m.groups if not m.transposed else w.shape[0], out
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            t = w if w is not None else m._buffers.get("running_mean")
            if t is not None:
                m.num_features = t.shape[0]
        elif isinstance(m, (nn.LayerNorm, *(() if not hasattr(nn, "RMSNorm") else (nn.RMSNorm,)))) and w is not None:
            m.normalized_shape = tuple(w.shape)
        elif isinstance(m, nn.GroupNorm) and w is not None:
            m.num_channels = w.shape[0]
        elif isinstance(m, nn.Embedding) and w is not None:
            m.num_embeddings, m.embedding_dim = w.shape


class _Stack:
    """Which modules are running (forward hooks on every module): after an exception, the
    innermost one that started and did not finish names the culprit."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.running: list[str] = []
        self.failed: str | None = None
        self.handles = [m.register_forward_pre_hook(self._pre) for m in model.modules()]
        self.handles += [m.register_forward_hook(self._post) for m in model.modules()]  # not called on a raise

    def _pre(self, m: nn.Module, args: Any) -> None:
        self.running.append(self.names.get(id(m), "?"))

    def _post(self, m: nn.Module, args: Any, out: Any) -> None:
        self.running.pop()

    def close(self) -> None:
        self.failed = self.running[-1] if self.running else None
        for h in self.handles:
            h.remove()


def _culprit(model: nn.Module, name: str | None) -> str:
    if not name:
        return type(model).__name__
    return f"{type(model.get_submodule(name)).__name__} {name!r}"


def _run_against(model: nn.Module, inputs: Any, ref: Any) -> float:
    """`model`'s largest relative difference from `ref` on `inputs`; a failure to run raises,
    naming the module and the line of its forward."""
    stack = _Stack(model)
    try:
        with eval_mode(model):
            out = call(model, inputs)
    except Exception as e:
        stack.close()
        line = failing_line(e)
        raise SurgeryError(f"Shrink(into='modules'): {_culprit(model, stack.failed)} fails on the pruned sizes: "
                           f"{first_line(e)}" + (f" at {line}" if line else "") +
                           f"; its forward hard-codes a size the pruning changes; {_GRAPH_FORM}") from e
    stack.close()
    try:
        return max_rel_diff(ref, out)
    except ValueError as e:
        raise SurgeryError(f"Shrink(into='modules'): {type(model).__name__} returns another structure than the "
                           f"masked model ({e}); {_GRAPH_FORM}") from e


@torch.no_grad()
def into_modules(work: fx.GraphModule, inputs: Any, ref: Any, tol: float, before: Before,
                 selected: list[tuple[Any, int, torch.Tensor]]) -> tuple[nn.Module, dict[str, Any]]:
    """The model's own classes with `work`'s edits (see the module docstring), verified against
    `ref`, the masked model's outputs on `inputs`, and its pruning plan (see
    :mod:`~surgery.shrink.pruning_plan`); `before` was taken before the edits, `selected` lists
    the edits' index selections."""
    source = surgery_meta(work).get("source")
    model = getattr(source, "module", None)
    if not isinstance(model, nn.Module):
        why = ("it was captured as an eager shell around traced children" if surgery_meta(work).get("shell")
               else "it was loaded from a file, which keeps the graph alone, or not made by surgery.capture")
        raise SurgeryError(f"Shrink(into='modules') needs the model's own module tree, which surgery.capture keeps "
                           f"beside the graph; this GraphModule has none ({why}); use Shrink() for the graph form")
    _transfer(work, model)
    _sync_sizes(model)
    _resize_attributes(model, resized_literals(before.literals, before.splits))
    eps_ratios = rescale_norms(model, before.norms)
    heads = _resize_head_counts(model, before)
    try:
        err = _run_against(model, inputs, ref)
    except SurgeryError:
        if not heads:
            raise
        err = float("inf")
    if heads and not err <= tol:  # a forward that reads a head count in a way the pruning keeps: as it was
        for (path, name), value in heads.items():
            setattr(model.get_submodule(path), name, value)
        err = _run_against(model, inputs, ref)
    if not err <= tol:
        raise SurgeryError(f"Shrink(into='modules'): {type(model).__name__} in its own classes differs from the "
                           f"masked model (max rel. error {err:.2e} > {tol:g}); a forward reads a size from an "
                           f"attribute or the config that the pruning changes; {_GRAPH_FORM}")
    surgery_meta(work).pop("source", None)
    carried = False
    if is_hf_model(model):
        try:
            fit_config(model, before.shapes, lambda: _run_against(model, inputs, ref) <= tol, eps_ratios)
        except LookupError as e:
            carried = True
            warn(f"Shrink(into='modules'): {type(model).__name__}.config keeps its sizes: {e}; it carries the "
                 f"pruning plan as {PLAN_FIELD} instead: after save_pretrained, reload with "
                 f"surgery.load_pruned({type(model).__name__}, directory), not from_pretrained")
    plan = plan_of(model, before.shapes, before.names, selected, before.attributes, before.config)
    if carried:
        setattr(model.config, PLAN_FIELD, plan)
    return model, plan
