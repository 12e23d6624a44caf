"""Torch-Pruning's side of the shrink sweep: what to ignore, its head settings for attention
(timm and Hugging Face), one pruning run, and the limits that keep a hanging or memory-hungry
run from costing more than its row. See benchmarks/shrink_sweep.py."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from _hf_models import output_tensors

from surgery.calling import call

__all__ = ["tp_prune", "time_limit", "limit_memory", "TP_MEMORY_GB"]


def _final_layer(model):
    from torch import nn
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return last


# query/key/value projections of an attention module, by attribute name: fused (timm's qkv, Phi-3's
# qkv_proj), q and a fused kv (timm's PVT), or one each (transformers' naming schemes)
_QKV_NAMES = (("qkv",), ("qkv_proj",), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
              ("q_lin", "k_lin", "v_lin"), ("query_proj", "key_proj", "value_proj"), ("q", "k", "v"), ("q", "kv"))
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_WIDTH = ("all_head_size", "inner_dim", "attn_dim")


def _int_attr(obj, names: tuple[str, ...]) -> int | None:
    """The first of `names` that `obj` holds as a positive int, or None."""
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _attention_layers(model) -> list[tuple[Any, tuple]]:
    """Every attention module of `model` with its query/key/value projections (nn.Linear), as
    named in _QKV_NAMES."""
    from torch import nn
    out = []
    for m in model.modules():
        for names in _QKV_NAMES:
            layers = tuple(getattr(m, n, None) for n in names)
            if all(isinstance(layer, nn.Linear) for layer in layers):
                out.append((m, layers))
                break
    return out


def _tp_num_heads(attention: list[tuple[Any, tuple]]) -> dict:
    """Torch-Pruning's num_heads argument as its examples build it: each q/k/v projection -> its
    number of heads. A fused projection gets the module's head count (timm: ``num_heads[m.qkv] =
    m.num_heads``; Phi-3's qkv_proj: config.num_attention_heads); separate ones their width over
    the head size where the module holds one (grouped-query k/v: the key-value head count, as in
    its LLM example), the module's head count otherwise."""
    heads = {}
    for m, layers in attention:
        n = _int_attr(m, _HEADS) or _int_attr(getattr(m, "config", None), ("num_attention_heads",))
        d = _int_attr(m, _HEAD_DIM)
        for layer in layers:
            fused = len(layers) == 1 or layer is getattr(m, "kv", None)
            count = n if fused or d is None else layer.out_features // d
            if count:
                heads[layer] = count
    return heads


def _tp_update_attention(attention: list[tuple[Any, tuple]], pruner, head_dims: bool) -> None:
    """After pruning, what Torch-Pruning's examples do by hand (it cannot know what these
    attributes mean): each attention module's head count (num_heads / num_attention_heads /
    n_heads), head size (head_dim / attention_head_size / key_value_proj_dim), total width
    (all_head_size / inner_dim / attn_dim), num_key_value_groups and num_key_value_heads under
    grouped-query attention, and a shared config's head counts (its LLM example).

    Where `head_dims` were pruned (timm), the head count is the pruner's and the head size the
    query width over it; where whole heads were (hf), the head size stays and the head counts
    are the pruned widths over it: what the projections hold, even where the pruner's own
    count disagrees with them (it does on MPNet)."""
    for m, layers in attention:
        q = layers[0]
        fused = len(layers) == 1
        width = q.out_features // 3 if fused and not hasattr(m, "num_key_value_groups") else q.out_features
        d = _int_attr(m, _HEAD_DIM)
        kv = None
        if head_dims or d is None or (fused and hasattr(m, "num_key_value_groups")):
            n = pruner.num_heads.get(q)
            if not n:
                continue
            d = width // n if head_dims or d is None else d
        else:
            n = width // d
            kv = layers[1].out_features // d if len(layers) == 3 else None
        for names, value in ((_HEADS, n), (_HEAD_DIM, d), (_WIDTH, n * d)):
            for a in names:
                if _int_attr(m, (a,)) is not None:
                    setattr(m, a, value)
        if kv:
            if _int_attr(m, ("num_key_value_groups",)) is not None:
                m.num_key_value_groups = max(1, n // kv)
            if _int_attr(m, ("num_key_value_heads",)) is not None:
                m.num_key_value_heads = kv
        config = getattr(m, "config", None)
        if config is not None and not head_dims:
            if _int_attr(config, ("num_attention_heads",)) is not None:
                config.num_attention_heads = n
            if kv and _int_attr(config, ("num_key_value_heads",)) is not None:
                config.num_key_value_heads = kv


def _output_layers(model, inputs) -> list:
    """The innermost modules whose output holds one of `model`'s output tensors (a backbone's
    final LayerNorm, a head's Linear): ignored by Torch-Pruning, so that the outputs keep their
    shapes (a group holding one of them is not pruned), as ChannelPrune never masks them."""
    import torch
    produced: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: produced.__setitem__(name, output_tensors(out)))
             for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            final = {id(t) for t in output_tensors(call(model, inputs))}
    finally:
        for h in hooks:
            h.remove()
    hits = [n for n, ts in produced.items() if any(id(t) in final for t in ts)]
    inner = [n for n in hits if not any(h.startswith(n + ".") for h in hits)]
    return [model.get_submodule(n) for n in inner]


def tp_prune(model, x, ratio: float, family: str = "torchvision") -> None:
    """Torch-Pruning on `model` in place, as the module docstring says (`x`: the input tensor
    for torchvision, the inputs tuple for timm, the keyword inputs for hf)."""
    import torch_pruning as tp
    imp = (getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.MagnitudeImportance)(p=2)
    Pruner = getattr(tp.pruner, "MetaPruner", None) or tp.pruner.BasePruner
    if family == "torchvision":
        pruner = Pruner(model, x, importance=imp, pruning_ratio=ratio, ignored_layers=[_final_layer(model)])
        pruner.step()
        return
    attention = _attention_layers(model)
    kwargs: dict = {"num_heads": _tp_num_heads(attention)}
    if family == "timm":
        from _timm_models import classifier
        ignored = classifier(model) or [_final_layer(model)]
        example = x[0]
    else:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        ignored = [head if head is not None else _final_layer(model), *_output_layers(model, x)]
        example = x
        kwargs.update(output_transform=output_tensors, prune_num_heads=True, prune_head_dims=False,
                      head_pruning_ratio=ratio)
    pruner = Pruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored, **kwargs)
    pruner.step()
    _tp_update_attention(attention, pruner, head_dims=family == "timm")


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after `seconds` (0: no limit). Torch-Pruning
    loops for good in pure Python on some models (transformers' Llama): a limit of its own
    costs it one row, not the subprocess's whole --timeout."""
    import signal
    if seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"over {seconds:g} s for one pruning run")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


TP_MEMORY_GB = 6  # Torch-Pruning needs > 16 GB on swin: keep it from taking the machine down


def limit_memory(extra_gb: float) -> None:
    """Cap this process's address space at its current size plus `extra_gb`."""
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        cap = vm + int(extra_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, OSError, StopIteration, ValueError):
        pass
