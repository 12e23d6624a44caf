"""The Hugging Face config of a model shrunk into its own classes: the sizes it states
(``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``hidden_size`` and their older names) brought in line with the pruned layers, so that
``save_pretrained`` then ``from_pretrained`` of the same class rebuilds the pruned model.

The new values are found, not guessed: every size field of the config gets candidates from the
widths the pruning changed (a field of 96 whose layers went from 96 to 48 wide; a head count
whose projections went from 4 to 2 heads wide), and the combination whose model, built on the
meta device (no memory, no initialisation), has exactly the pruned model's parameter shapes
wins. Where none does (widths that differ from layer to layer), the config is left alone and
:func:`fit_config` says so.
"""
from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .pruning_plan import public_attributes, shapes

__all__ = ["fit_config", "is_hf_model"]

# size fields across transformers' configs (encoders, decoders, encoder-decoders, vision)
WIDTHS = ("intermediate_size", "hidden_size", "d_model", "d_ff", "d_kv", "n_inner", "n_embd", "ffn_dim",
          "encoder_ffn_dim", "decoder_ffn_dim", "hidden_dim", "dim", "embed_dim", "head_dim", "kv_channels")
HEADS = ("num_attention_heads", "num_key_value_heads", "num_heads", "n_head", "n_heads", "encoder_attention_heads",
         "decoder_attention_heads", "num_kv_heads", "multi_query_group_num")
_MAX_TRIES = 512


def is_hf_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed: transformers need not be imported)."""
    config = getattr(model, "config", None)
    return callable(getattr(model, "save_pretrained", None)) and callable(getattr(config, "to_dict", None))


def _changes(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]) -> dict[int, set[int]]:
    """old width -> the widths it became, over every tensor axis the pruning changed."""
    out: dict[int, set[int]] = {}
    for k, old in before.items():
        new = after.get(k)
        if new is not None and len(new) == len(old):
            for a, b in zip(old, new):
                if a != b:
                    out.setdefault(a, set()).add(b)
    return out


def _candidates(config: Any, changes: dict[int, set[int]], eps_ratios: set[float]) -> dict[str, list[Any]]:
    fields = {f: getattr(config, f) for f in (*WIDTHS, *HEADS) if type(getattr(config, f, None)) is int}
    heads = fields.get("num_attention_heads") or fields.get("num_heads") or fields.get("n_head")
    width = fields.get("hidden_size") or fields.get("d_model") or fields.get("n_embd")
    head_dim = fields.get("head_dim") or fields.get("d_kv") or (width // heads if heads and width else None)
    out = {}
    if "head_dim" not in fields and head_dim and "head_dim" not in vars(config):
        # derived (hidden_size // heads) unless stated: fewer heads must not make each one wider
        out["head_dim"] = [head_dim, *sorted(changes.get(head_dim, ()))]
    for f, v in fields.items():
        options = {v, *changes.get(v, ())}
        if f in HEADS and head_dim:  # heads * head size wide projections, now narrower
            options |= {w // head_dim for w in changes.get(v * head_dim, ()) if w % head_dim == 0}
        out[f] = sorted(options, key=lambda o: (o == v, o))  # changed values first
    for f, v in vars(config).items():  # an RMSNorm over a pruned stream takes eps * N/K (see module_norms)
        if "eps" in f and type(v) is float and eps_ratios:
            out[f] = [*(v * r for r in sorted(eps_ratios)), v]
    return out


def _builds(model: nn.Module, config: Any, want: dict[str, tuple[int, ...]]) -> bool:
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # an inconsistent combination (a width that the head count does not divide)
        return False
    return shapes(fresh) == want


def _swap(model: nn.Module, old: Any, new: Any) -> None:
    for m in model.modules():  # every module that holds the config (transformers hands it down)
        if m.__dict__.get("config") is old:
            m.config = new


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no initialisation)
    and their buffers for real: rotary frequencies and embedding scales are computed from the
    config, and are not saved (from_pretrained computes them again)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: Any) -> None:
        register(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _as_reloaded(model: nn.Module, config: Any, check: Callable[[], bool]) -> bool:
    """`check()` with every module's plain attributes (sizes, eps, scaling) and unsaved buffers as
    a model built from `config` has them: what from_pretrained gives, with our weights. Ours are
    put back afterwards."""
    try:
        with _parameters_on_meta():
            fresh = dict(type(model)(config).named_modules())
    except Exception:
        return False
    saved: list[tuple[dict, str, Any]] = []

    def swap(table: dict, k: str, v: Any) -> None:
        saved.append((table, k, table[k]))
        table[k] = v
    try:
        for name, m in model.named_modules():
            f = fresh.get(name)
            if f is None or type(f) is not type(m):
                return False
            for k, v in public_attributes(f).items():
                if k in vars(m) and vars(m)[k] != v:
                    swap(m.__dict__, k, v)
            for k in m._non_persistent_buffers_set & f._non_persistent_buffers_set:
                if isinstance(f._buffers.get(k), torch.Tensor) and isinstance(m._buffers.get(k), torch.Tensor):
                    swap(m._buffers, k, f._buffers[k].to(m._buffers[k].device))
        return check()
    finally:
        for table, k, v in reversed(saved):
            table[k] = v


@torch.no_grad()
def fit_config(model: nn.Module, before: dict[str, tuple[int, ...]], check: Callable[[], bool],
               eps_ratios: set[float] = frozenset()) -> list[str]:
    """Update the config of `model` (and of every submodule holding it) to the pruned widths
    (`before`: the parameter and buffer shapes of the unpruned model, by name), as long as
    `check()` (the model run against its reference) still holds with it, and with every module's
    sizes and epsilons as the config would build them (`eps_ratios`: the N/K of the RMSNorms
    rescaled over a pruned stream, whose eps the config must state): a forward may read a size
    from the config at run time (Gemma's ``sqrt(hidden_size)``). Returns the fields changed;
    raises LookupError (the config left as it was) when no combination of candidate values
    rebuilds the pruned shapes, or the one that does changes what the model computes."""
    want = shapes(model)
    config = model.config
    options = _candidates(config, _changes(before, want), set(eps_ratios))
    names = [f for f, o in options.items() if len(o) > 1 or not hasattr(config, f)]
    for i, values in enumerate(itertools.product(*(options[f] for f in names))):
        if i >= _MAX_TRIES:
            break
        trial = copy.deepcopy(config)
        for f, v in zip(names, values):
            setattr(trial, f, v)
        if _builds(model, trial, want):
            changed = [f for f, v in zip(names, values) if getattr(config, f, None) != v]
            _swap(model, config, trial)
            if _as_reloaded(model, trial, check):
                return changed
            _swap(model, trial, config)
    raise LookupError("no config rebuilds the pruned model: its widths differ from layer to layer, or a forward "
                      "reads a size from the config at run time that the pruned values would change")
