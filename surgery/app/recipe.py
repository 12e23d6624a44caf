"""Recipes: a TOML file that lists passes and their fields, one-to-one with the pass dataclasses.

Example recipe::

    # prune half the channels of every conv except the stem, then shrink
    [[passes]]
    pass = "ChannelPrune"
    ratio = 0.5
    select = ["Conv2d"]
    exclude = ["conv1"]

    [[passes]]
    pass = "Shrink"

``pass`` names a class in ``passes.__all__``; every other key is a field of that dataclass.
A TOML list given for a field becomes a tuple (selectors, shapes) unless the field is
annotated as a list; a table ``{type = "AGP", ...}`` whose ``type`` names a dataclass exported
by ``passes`` becomes that object (nested configuration such as a schedule).

Every value is checked when the recipe is loaded (the passes validate their fields when built):
a bad one raises :class:`~surgery.errors.ConfigError` naming the file, the table and the key,
``recipe.toml: [[passes]] #2 (ChannelPrune): round_to = 8.5: expected an integer >= 1``. Given
the model (``model=``), every pass's selection is also checked against the model's modules before
any pass runs (:class:`~surgery.errors.SelectionError` naming the file, the pass and the selector).

    >>> from surgery.app.recipe import parse_recipe
    >>> parse_recipe('[[passes]]\\npass = "Identity"\\nselect = ["Linear"]\\n')
    [Identity(select=('Linear',), exclude=None)]
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from typing import Any

from ..errors import ConfigError, SelectionError, SurgeryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared dependency for 3.10
    import tomli as tomllib

__all__ = ["load_recipe", "parse_recipe", "recipe_from_dict", "available_passes", "check_selections"]

PASS_KEY = "passes"
NAME_KEY = "pass"


def available_passes() -> dict[str, type]:
    """The dataclass passes the `passes` package exports, by class name."""
    import passes
    out = {}
    for name in getattr(passes, "__all__", ()):
        obj = getattr(passes, name, None)
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and callable(getattr(obj, "apply", None)):
            out[name] = obj
    return out


def _config_classes() -> dict[str, type]:
    """Every dataclass exported by `passes` (schedules and other nested configuration)."""
    import passes
    return {n: o for n in getattr(passes, "__all__", ()) if isinstance(o := getattr(passes, n, None), type)
            and dataclasses.is_dataclass(o)}


def _hint(valid: list[str], word: str) -> str:
    near = difflib.get_close_matches(word, valid, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _wants_list(cls: type, f: dataclasses.Field) -> bool:
    """True when the field is annotated as a list (a TOML list then stays a list, not a tuple)."""
    try:
        hint = typing.get_type_hints(cls).get(f.name, f.type)
    except Exception:  # forward references that do not resolve: read the raw annotation
        hint = f.type
    if hint is list or typing.get_origin(hint) is list:
        return True
    return isinstance(hint, str) and hint.replace("typing.", "").strip().lower().startswith("list")


def _convert(value: Any, as_list: bool, where: str) -> Any:
    if isinstance(value, dict) and "type" in value:
        classes = _config_classes()
        cls = classes.get(value["type"])
        if cls is None:
            raise SurgeryError(f"{where}: unknown type {value['type']!r}{_hint(sorted(classes), str(value['type']))}; "
                               f"valid: {', '.join(sorted(classes)) or 'none'}")
        fields = {k: v for k, v in value.items() if k != "type"}
        return _build(cls, fields, f"{where} ({value['type']})")
    if isinstance(value, list):
        items = [_convert(v, False, where) for v in value]
        return items if as_list else tuple(items)
    if isinstance(value, dict):
        return {k: _convert(v, False, where) for k, v in value.items()}
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise SurgeryError(f"{where}: unknown field {unknown[0]!r}{_hint(list(fields), unknown[0])}; "
                           f"valid fields of {cls.__name__}: {', '.join(fields) or 'none'}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SurgeryError(f"{where}: {cls.__name__} needs field(s) {', '.join(missing)}")
    kwargs = {k: _convert(v, _wants_list(cls, fields[k]), f"{where}, key {k!r}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # the pass names itself ("ChannelPrune"); the reader of a recipe needs the file and table
        owner = where if e.owner == cls.__name__ else f"{where}: {e.owner}"
        raise ConfigError(owner, e.field, e.value, e.allowed) from None
    except SurgeryError as e:
        raise SurgeryError(f"{where}: {e}") from e
    except (TypeError, ValueError) as e:
        raise SurgeryError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                           f"failed: {e}") from e


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>", model: Any = None) -> list[Any]:
    """Build the pass objects a parsed recipe lists (see the module docstring); with `model`,
    check their selections against it (:func:`check_selections`)."""
    extra = [k for k in data if k != PASS_KEY]
    if extra:
        raise SurgeryError(f"{source}: unknown top-level key {extra[0]!r}; a recipe holds only "
                           f"[[{PASS_KEY}]] tables")
    entries = data.get(PASS_KEY)
    if not isinstance(entries, list) or not entries:
        raise SurgeryError(f"{source}: no passes; add at least one [[{PASS_KEY}]] table with {NAME_KEY} = \"...\"")
    registry = available_passes()
    out = []
    for k, entry in enumerate(entries, 1):
        where = f"{source}: [[{PASS_KEY}]] #{k}"
        if not isinstance(entry, dict) or NAME_KEY not in entry:
            raise SurgeryError(f"{where}: missing {NAME_KEY} = \"<name>\"; valid passes: {', '.join(sorted(registry))}")
        name = entry[NAME_KEY]
        cls = registry.get(name)
        if cls is None:
            raise SurgeryError(f"{where}: unknown pass {name!r}{_hint(sorted(registry), str(name))}; "
                               f"valid passes: {', '.join(sorted(registry))}")
        out.append(_build(cls, {kk: v for kk, v in entry.items() if kk != NAME_KEY}, f"{where} ({name})"))
    if model is not None:
        check_selections(out, model, source)
    return out


def parse_recipe(text: str, source: str = "<recipe>", model: Any = None) -> list[Any]:
    """Parse TOML text into a list of pass objects (checked against `model` when given)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SurgeryError(f"{source}: not valid TOML ({e})") from None
    return recipe_from_dict(data, source, model)


def load_recipe(path: str | os.PathLike, model: Any = None) -> list[Any]:
    """Read a TOML recipe file into a list of pass objects, in order. With `model` (the
    nn.Module the recipe will compress), a selection that matches none of its modules fails
    here, before any pass runs."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise SurgeryError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: cannot read recipe ({e})") from None
    return parse_recipe(text, str(path), model)


def _selector_fields(p: Any) -> list[str]:
    """The fields of pass `p` annotated as a :data:`surgery.select.Selector` (select, exclude,
    GumbelMask's trainable), in declaration order."""
    from ..select import Selector
    try:
        hints = typing.get_type_hints(type(p))
    except Exception:  # unresolvable forward references: read the raw annotations
        hints = {}
    return [f.name for f in dataclasses.fields(p)
            if hints.get(f.name, f.type) == Selector or str(f.type).rpartition(".")[2] == "Selector"]


def _items(sel: Any) -> list:
    return list(sel) if isinstance(sel, (tuple, list, set, frozenset)) else [sel]


def _graph_only(sel: Any) -> bool:
    """True when `sel` holds a callable: it may be written against the captured graph (its
    module names, mask modules, node metadata), so calling it on the eager model proves nothing."""
    return any(callable(i) and not isinstance(i, (type, str, re.Pattern)) for i in _items(sel))


def _inserted(p: Any, model: Any) -> list[tuple[str, Any]] | None:
    """(name, module) pairs standing for the modules pass `p` may add to the graph, from its
    ``inserts`` (name globs and module classes): each glob with ``*`` filled in by the model's
    module names (as they are and with dots as underscores, the way masks are named), each class
    as a bare instance (made without __init__: surgery.select reads only its type). None when
    the pass declares nothing, so it may add anything."""
    from torch import nn
    declared = getattr(p, "inserts", None)
    if declared is None:
        return None
    names = [n for n, _ in model.named_modules() if n]
    fills = sorted({"x", *names, *(n.replace(".", "_") for n in names)})
    blank = nn.Module()  # a name stand-in: only its name is meant to match
    out: list[tuple[str, Any]] = []
    for entry in declared:
        if isinstance(entry, str):
            out += [(entry.replace("*", f), blank) for f in (fills if "*" in entry else [""])]
        else:
            out.append(("", entry.__new__(entry)))
    return out


def check_selections(passes: list[Any], model: Any, source: str = "<recipe>") -> None:
    """SelectionError naming the recipe, the pass (#index and name) and the selector when a
    pass's `select` (after its `exclude`), its `exclude` or another selector field matches no
    module of `model`, the eager model the recipe is about to compress.

    Only selection by type and by name can be checked before capture: which selected modules
    produce channels, or are graph nodes at all, the passes check on the graph when applied.
    Selectors only meaningful on the graph are left to the passes: those holding a callable (it
    may expect the captured graph), and those that may name a module an earlier pass of the
    recipe adds (a mask, a region, a weight parametrization: ``select = "dam_*"`` after DAM),
    as declared by that pass's ``inserts`` (``ClassVar``: name globs and module classes); such
    modules do not exist in the eager model.
    """
    from ..select import describe, matches, select_modules
    inserted: list[tuple[str, Any]] = []  # stand-ins for what earlier passes may have added
    anything = False  # an earlier pass did not say what it adds
    for k, p in enumerate(passes, 1):
        where = f"{source}: [[{PASS_KEY}]] #{k} ({type(p).__name__})"
        for field in _selector_fields(p):
            sel = getattr(p, field)
            if sel is None or _graph_only(sel):
                continue
            # select is read with the pass's exclude; exclude and the rest must match by themselves
            exclude = getattr(p, "exclude", None) if field == "select" else None
            exclude = None if _graph_only(exclude) else exclude
            try:
                select_modules(model, sel, exclude)
            except SelectionError as e:
                if anything or any(matches(n, m, sel, exclude) for n, m in inserted):
                    continue
                shown = f"{field}={describe(sel)}" + (f" (exclude={describe(exclude)})" if exclude is not None else "")
                raise SelectionError(f"{where}: {shown} matched no module of {type(model).__name__}",
                                     e.nearest) from None
        added = _inserted(p, model)
        anything = anything or added is None
        inserted += added or []
