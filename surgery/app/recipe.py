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

    >>> from surgery.app.recipe import parse_recipe
    >>> parse_recipe('[[passes]]\\npass = "Identity"\\nselect = ["Linear"]\\n')
    [Identity(select=('Linear',), exclude=None)]
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from typing import Any

from ..errors import SurgeryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared dependency for 3.10
    import tomli as tomllib

__all__ = ["load_recipe", "parse_recipe", "recipe_from_dict", "available_passes"]

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
    kwargs = {k: _convert(v, _wants_list(cls, fields[k]), f"{where}, field {k!r}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except SurgeryError as e:
        raise SurgeryError(f"{where}: {e}") from e
    except (TypeError, ValueError) as e:
        raise SurgeryError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                           f"failed: {e}") from e


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> list[Any]:
    """Build the pass objects a parsed recipe lists (see the module docstring)."""
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
        where = f"{source}: pass #{k}"
        if not isinstance(entry, dict) or NAME_KEY not in entry:
            raise SurgeryError(f"{where}: missing {NAME_KEY} = \"<name>\"; valid passes: {', '.join(sorted(registry))}")
        name = entry[NAME_KEY]
        cls = registry.get(name)
        if cls is None:
            raise SurgeryError(f"{where}: unknown pass {name!r}{_hint(sorted(registry), str(name))}; "
                               f"valid passes: {', '.join(sorted(registry))}")
        out.append(_build(cls, {kk: v for kk, v in entry.items() if kk != NAME_KEY}, f"{where} ({name})"))
    return out


def parse_recipe(text: str, source: str = "<recipe>") -> list[Any]:
    """Parse TOML text into a list of pass objects."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SurgeryError(f"{source}: not valid TOML ({e})") from None
    return recipe_from_dict(data, source)


def load_recipe(path: str | os.PathLike) -> list[Any]:
    """Read a TOML recipe file into a list of pass objects, in order."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise SurgeryError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: cannot read recipe ({e})") from None
    return parse_recipe(text, str(path))
