"""Validators for pass fields, shared by every pass's ``__post_init__``.

Each checks one value when a pass is built and raises
:class:`~surgery.errors.ConfigError` ``(owner, field, value, allowed)``: a bad value fails where
it is written (a constructor call, a recipe line), not as a TypeError deep inside ``apply``.

Example::

    >>> number("ChannelPrune", "round_to", 8.5, lo=1, integer=True)
    Traceback (most recent call last):
    ...
    surgery.errors.ConfigError: ChannelPrune: round_to = 8.5: expected an integer >= 1
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import numbers
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from surgery.errors import ConfigError, SelectionError

__all__ = ["number", "flag", "choice", "selector", "identifier", "per_name", "instance", "lookup", "check_keys_used",
           "SEED_MAX", "FLOAT32_MAX"]

SEED_MAX = 2**63 - 1
"""Largest seed every generator we hand seeds to accepts (torch.Generator.manual_seed, numpy)."""

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""Bound for a value stored in a float32 parameter or buffer (larger ones overflow or become inf)."""


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(lo: Any, hi: Any, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_fmt(hi)}"
    return ""


def number(owner: str, field: str, value: Any, *, lo: Any = None, hi: Any = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False, finite: bool = True, why: str = "") -> None:
    """A real number (an integer with ``integer=True``) within [lo, hi] (open ends on request).

    A bool is not a number here (``ratio=True`` is a mistake, not 1.0), nor is a float an integer
    (``round_to=8.0`` says the author thought of a fraction). NaN is never accepted; infinity
    only with ``finite=False``.
    """
    kind = "an integer" if integer else ("a finite number" if finite and hi is None else "a number")
    allowed = f"expected {kind}{_range(lo, hi, lo_open, hi_open)}" + (f" ({why})" if why else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise ConfigError(owner, field, value, allowed)
    if not integer:
        try:
            f = float(value)
        except (OverflowError, ValueError, TypeError):  # an int past float range
            raise ConfigError(owner, field, value, allowed) from None
        if math.isnan(f) or (finite and math.isinf(f)):
            raise ConfigError(owner, field, value, allowed)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(owner, field, value, allowed)
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ConfigError(owner, field, value, allowed)


def flag(owner: str, field: str, value: Any) -> None:
    """A bool: True or False (not 0/1, not "yes")."""
    if not isinstance(value, bool):
        raise ConfigError(owner, field, value, "expected a bool (True or False)")


def choice(owner: str, field: str, value: Any, allowed: Sequence[str | int]) -> None:
    """One of `allowed` (strings, or integers such as bit widths); a near-miss string is named."""
    def same_kind(a: str | int) -> bool:  # compare only like with like: no True == 1, no array == 4
        if isinstance(a, str):
            return isinstance(value, str)
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if any(same_kind(a) and value == a for a in allowed):
        return
    words = [a for a in allowed if isinstance(a, str)]
    near = difflib.get_close_matches(value, words, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(owner, field, value, f"expected one of {', '.join(map(repr, allowed))}{hint}")


def identifier(owner: str, field: str, value: Any, what: str) -> None:
    """A Python identifier (an attribute name such as ``"weight"``)."""
    if not (isinstance(value, str) and value.isidentifier()):
        raise ConfigError(owner, field, value, f"expected {what}")


_SELECTOR_FORMS = ("an nn.Module subclass, a class name or glob over module names (str), a compiled regex, "
                   "a callable (name, module) -> bool, or a tuple/list of those")


def _selector_item(item: Any) -> str:
    """Why `item` is not a legal selector entry ('' when it is). The forms are surgery.select's;
    the refusals below are entries select.py would accept but that cannot mean what was meant."""
    if isinstance(item, type):
        return "" if issubclass(item, nn.Module) else f"{item.__name__} is not an nn.Module subclass"
    if isinstance(item, str):
        return "" if item else "an empty name matches no module"
    if isinstance(item, re.Pattern):
        return "" if isinstance(item.pattern, str) else "a bytes regex cannot search module names"
    if isinstance(item, nn.Module):  # callable, but select would call its forward(name, module)
        return f"{_a(type(item).__name__)} instance; give the class {type(item).__name__}"
    if callable(item):
        return ""
    return _a(type(item).__name__)


def selector(owner: str, field: str, value: Any, *, empty_ok: bool = True) -> None:
    """A selector as :mod:`surgery.select` reads it: None, one entry, or a tuple/list/set of entries.

    ``empty_ok=False`` refuses an empty collection: surgery.select reads ``select=()`` as "no
    restriction", i.e. everything, which a recipe's ``select = []`` surely did not mean.
    """
    if value is None:
        return
    items = list(value) if isinstance(value, (tuple, list, set, frozenset)) else [value]
    if not items and not empty_ok:
        raise ConfigError(owner, field, value, f"expected a non-empty selector ({_SELECTOR_FORMS}); "
                                               "None selects everything")
    for item in items:
        why = _selector_item(item)
        if why:
            raise ConfigError(owner, field, value, f"expected {_SELECTOR_FORMS}; got {why}")


def per_name(owner: str, field: str, value: Any, validate: Callable[[str, str, Any], None], what: str) -> None:
    """One value for every tensor, or a dict {tensor name or glob: value}; `validate(owner, field,
    value)` checks each value (``field['key']`` names the entry of a dict)."""
    if not isinstance(value, dict):
        try:
            validate(owner, field, value)
        except ConfigError as e:
            raise ConfigError(owner, field, value, f"{e.allowed}, or a dict {{tensor name or glob: {what}}}") \
                from None
        return
    if not value:
        raise ConfigError(owner, field, value, f"expected a non-empty dict {{tensor name or glob: {what}}}")
    for key, v in value.items():
        if not (isinstance(key, str) and key):
            raise ConfigError(owner, field, value, f"expected tensor names or globs as keys; got {key!r}")
        validate(owner, f"{field}[{key!r}]", v)


def instance(owner: str, field: str, value: Any, cls: type, *, none_ok: bool = True) -> None:
    """An instance of `cls` (or None when `none_ok`): nested configuration such as a schedule."""
    if (value is None and none_ok) or isinstance(value, cls):
        return
    extra = " or None" if none_ok else ""
    raise ConfigError(owner, field, value, f"expected {_a(cls.__name__)}{extra} "
                                           f"(in a recipe: {{ type = \"{cls.__name__}\", ... }})")


def _names(pattern: str, name: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def lookup(table: dict[str, Any], name: str) -> Any:
    """The value of the first key of a per-name table that is `name` or a glob matching it
    (None when none does): how MagnitudePrune's sparsity and WeightShare's bits read their dicts."""
    return next((value for pattern, value in table.items() if _names(pattern, name)), None)


def check_keys_used(owner: str, field: str, table: dict[str, Any], names: Sequence[str]) -> None:
    """SelectionError naming the keys of a per-name table that match none of `names` (the
    selected tensors), with the nearest tensor names: a misspelt key must not be ignored."""
    unused = [p for p in table if not any(_names(p, n) for n in names)]
    if unused:
        near = [n for p in unused for n in difflib.get_close_matches(p, list(names), n=3, cutoff=0.3)]
        raise SelectionError(f"{owner}: {field} keys matched no selected tensor: {', '.join(unused)}",
                             list(dict.fromkeys(near or list(names)[:5]))[:8])
