"""A pruning plan as data: what ``Shrink(into="modules")`` did to a model, replayable on a fresh one.

A plan lists, for every parameter and buffer whose shape changed, its new shape and which indices
survive along which axes (as ``[start, stop)`` ranges: compact for the long runs pruning leaves);
every module attribute that changed (``in_features``, ``num_heads``, an RMSNorm's eps); and every
config field that changed. It is JSON:

    {"format": "surgery-plan/1", "class": "transformers.models.llama.modeling_llama.LlamaForCausalLM",
     "tensors": {"model.layers.0.mlp.up_proj.weight": {"shape": [48, 64], "keep": {"0": [[0, 3], [5, 50]]}}},
     "attributes": {"model.layers.0.mlp.up_proj": {"out_features": 48}},
     "config": {"intermediate_size": 48}}

:func:`apply_plan` replays it on a freshly built original model: each tensor keeps the listed
indices of its current values (so a model holding the original weights becomes the pruned one
before fine-tuning), attributes and config fields are set. The pruned weights then load into it.
:func:`save_pruned` writes the plan and the weights (``model.safetensors``: no pickle), and
:func:`load_pruned` rebuilds the model from a factory (or a fresh model) and that directory.

Values a plan does not describe: a mask's kept factors folded into a layer and an RMSNorm's
rescaled weight change values, not shapes; they live in the saved weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..copying import tied_tensors
from ..errors import SurgeryError
from .cut import select_indices

__all__ = ["plan_of", "apply_plan", "save_plan", "load_plan", "save_pruned", "load_pruned", "FORMAT", "PLAN_FIELD"]

FORMAT = "surgery-plan/1"
PLAN_FILE, WEIGHTS_FILE = "plan.json", "model.safetensors"
PLAN_FIELD = "surgery_plan"  # where a Hugging Face config carries a plan it cannot state in its own fields


def plain(v: Any) -> bool:
    """A value a plan can hold and compare: a number, string, bool, None, or a tuple of them."""
    return v is None or type(v) in (int, float, bool, str) or type(v) is tuple and all(map(plain, v))


def public_attributes(m: nn.Module) -> dict[str, Any]:
    """`m`'s own plain public attributes (sizes, eps), its training flag aside."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training" and plain(v)}


def attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's :func:`public_attributes`, by qualified name."""
    return {name: public_attributes(m) for name, m in model.named_modules()}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's and buffer's shape, by state_dict name."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def owner_of(root: nn.Module, target: str) -> tuple[nn.Module | None, str]:
    """The module holding `target`'s last part, and that part (None when the path is missing)."""
    path, _, name = target.rpartition(".")
    try:
        return (root.get_submodule(path) if path else root), name
    except AttributeError:
        return None, name


def _ranges(idx: np.ndarray) -> list[list[int]]:
    if len(idx) == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def _indices(ranges: list[list[int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.long)


def config_fields(model: nn.Module) -> dict[str, Any]:
    """The plain fields of `model`'s config (a Hugging Face model's), or none."""
    config = getattr(model, "config", None)
    return {k: v for k, v in vars(config).items() if not k.startswith("_") and plain(v)} if config is not None else {}


def plan_of(model: nn.Module, shapes_before: dict[str, tuple[int, ...]], names: dict[Any, list[str]],
            selected: list[tuple[Any, int, torch.Tensor]], attrs_before: dict[str, dict[str, Any]],
            config_before: dict[str, Any]) -> dict[str, Any]:
    """The plan of `model` (pruned, in its own classes) against what it was: `shapes_before`, `attrs_before`
    and `config_before` of the unpruned model, `names` (tensor key -> qualified names) and Shrink's
    `selected` index selections (tensor key, axis, kept indices)."""
    keep: dict[str, dict[str, list[list[int]]]] = {}
    for key, dim, idx in selected:
        for name in names.get(key, ()):
            keep.setdefault(name, {})[str(dim)] = _ranges(idx.numpy())
    tensors = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if shapes_before.get(name) != tuple(t.shape):
            tensors[name] = {"shape": list(t.shape), **({"keep": keep[name]} if name in keep else {})}
    after = attributes(model)
    changed = {path: {k: v for k, v in now.items() if attrs_before.get(path, {}).get(k, v) != v}
               for path, now in after.items()}
    config = {k: v for k, v in config_fields(model).items() if config_before.get(k, v) != v}
    cls = type(model)
    return {"format": FORMAT, "class": f"{cls.__module__}.{cls.__qualname__}", "tensors": tensors,
            "attributes": {p: a for p, a in changed.items() if a}, "config": config}


def _holder(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, attr = owner_of(model, name)
    if owner is None or (attr not in owner._parameters and attr not in owner._buffers):
        raise SurgeryError(f"apply_plan: {type(model).__name__} has no parameter or buffer {name!r}: the plan was "
                           "made for another model")
    return owner, attr


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, Any] | str | os.PathLike) -> nn.Module:
    """Replay `plan` (a dict, or a plan file) on `model`, a freshly built original model, in place;
    returns it. Raises SurgeryError naming the first tensor, attribute or class that does not fit."""
    plan = load_plan(plan) if not isinstance(plan, dict) else plan
    if plan.get("format") != FORMAT:
        raise SurgeryError(f"apply_plan: not a surgery plan (format {plan.get('format')!r}, expected {FORMAT!r})")
    cls = type(model)
    if plan["class"].rpartition(".")[2] != cls.__qualname__.rpartition(".")[2]:
        raise SurgeryError(f"apply_plan: the plan is for {plan['class']}, not {cls.__module__}.{cls.__qualname__}")
    done: dict[int, torch.Tensor] = {}  # tied tensors: one new tensor for all their names
    for name, entry in plan["tensors"].items():
        owner, attr = _holder(model, name)
        table = owner._parameters if attr in owner._parameters else owner._buffers
        old = table[attr]
        new = done.get(id(old))
        if new is None:
            new = old.detach()
            new = select_indices(new, {int(d): _indices(r).to(new.device) for d, r in entry.get("keep", {}).items()})
            if list(new.shape) != entry["shape"]:
                if "keep" in entry:
                    raise SurgeryError(f"apply_plan: {name!r} is {tuple(old.shape)}, which the plan's kept indices "
                                       f"do not bring to {tuple(entry['shape'])}: another model's plan")
                new = torch.zeros(entry["shape"], dtype=old.dtype, device=old.device)  # the weights come later
            new = new.contiguous()
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            done[id(old)] = new
        table[attr] = new
    for path, attrs in plan["attributes"].items():
        try:
            m = model.get_submodule(path)
        except AttributeError:
            raise SurgeryError(f"apply_plan: {type(model).__name__} has no module {path!r}") from None
        for k, v in attrs.items():
            setattr(m, k, tuple(v) if isinstance(v, list) else v)
    config = getattr(model, "config", None)
    for k, v in plan["config"].items():
        setattr(config, k, v)
    return model


def save_plan(model_or_plan: nn.Module | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the plan of a model that ``Shrink(into="modules")`` returned (or a plan dict) as JSON."""
    plan = model_or_plan if isinstance(model_or_plan, dict) else _plan_of_model(model_or_plan)
    path = Path(path)
    path.write_text(json.dumps(plan, indent=1))
    return path


def load_plan(path: str | os.PathLike) -> dict[str, Any]:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{path}: not a readable surgery plan ({e})") from e
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise SurgeryError(f"{path}: not a surgery plan (expected format {FORMAT!r})")
    return plan


def _plan_of_model(model: nn.Module) -> dict[str, Any]:
    plan = getattr(getattr(model, "report", None), "plan", None)
    if plan is None:
        raise SurgeryError(f"{type(model).__name__} carries no pruning plan: plans come from "
                           "Shrink(into='modules'), which returns the model in its own classes")
    return plan


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:  # a dependency of surgery: only a broken install gets here
        raise SurgeryError("save_pruned/load_pruned need safetensors (pip install safetensors)") from e
    return safetensors.torch


def save_pruned(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (from ``Shrink(into="modules")``) as ``plan.json`` and ``model.safetensors``:
    no pickle; :func:`load_pruned` rebuilds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_plan(model, directory / PLAN_FILE)
    _safetensors().save_model(model, str(directory / WEIGHTS_FILE))
    return directory


def load_pruned(factory_or_model: Callable[[], nn.Module] | type | nn.Module,
                directory: str | os.PathLike) -> nn.Module:
    """The pruned model saved in `directory`, rebuilt: a fresh original model with the plan applied
    and the weights loaded, every one of them.

    `factory_or_model` builds the fresh model: a callable, a model (changed in place), or a
    Hugging Face model class, built from the config in `directory`. The plan is ``plan.json``
    (:func:`save_pruned`) or, for a Hugging Face model whose config cannot state its widths, the
    config's ``surgery_plan`` field (``save_pretrained`` writes it): so
    ``load_pruned(LlamaForCausalLM, directory)`` reloads either kind of directory."""
    directory = Path(directory)
    if isinstance(factory_or_model, nn.Module):
        model = factory_or_model
    elif isinstance(factory_or_model, type) and hasattr(factory_or_model, "config_class"):
        model = factory_or_model(factory_or_model.config_class.from_pretrained(directory))
    else:
        model = factory_or_model()
    plan = getattr(getattr(model, "config", None), PLAN_FIELD, None)
    if (directory / PLAN_FILE).exists():
        plan = load_plan(directory / PLAN_FILE)
    if plan is None:
        raise SurgeryError(f"{directory}: no {PLAN_FILE}, and the config carries no {PLAN_FIELD}: not a pruned model "
                           "saved by surgery.save_pruned or by save_pretrained after Shrink(into='modules')")
    apply_plan(model, plan)
    model.eval()
    missing, unexpected = _safetensors().load_model(model, str(directory / WEIGHTS_FILE), strict=False)
    tied = {name for holders in tied_tensors(model).values() for name, *_ in holders}
    missing = [m for m in missing if m not in tied]  # a tied tensor is saved once, under one of its names
    if missing or unexpected:
        raise SurgeryError(f"{directory / WEIGHTS_FILE}: does not fit the planned {type(model).__name__} "
                           f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model
