"""Open any model file safely: TorchScript, state_dict, surgery compact archive, pickled module.

Pickles run code when they are loaded, so a pickle is only ever opened with
``torch.load(weights_only=True)`` (tensors and plain containers, no code) unless the caller
passes ``trust=True``. A file that needs full unpickling raises :class:`~surgery.errors.UnsafeFile`.

Example::

    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "sd.pt")
    >>> torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    >>> loaded = load_model_file(path)
    >>> loaded.kind, sorted(loaded.model)
    ('state_dict', ['bias', 'weight'])
"""
from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import BadModelFile, SurgeryError, UnsafeFile, first_line
from .archive import load as load_archive
from .archive import regular_file

__all__ = ["LoadedModel", "load_model_file"]

# keys under which training checkpoints commonly nest their state_dict
# a compact archive (surgery.save) starts with b"SURGERY" and a format version byte
COMPACT_MAGIC = b"SURGERY"
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "weights", "net")


@dataclass
class LoadedModel:
    """What :func:`load_model_file` found: `kind` is one of ``torchscript``, ``state_dict``,
    ``compact``, ``module`` or ``graphmodule``; `model` an nn.Module or a dict of tensors."""

    path: str
    kind: str
    model: Any
    note: str = ""


def _zip_kind(path: Path) -> str:
    """'torchscript', 'torch' (a torch.save archive) or 'zip' (something else)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise BadModelFile(path, f"truncated or corrupt zip archive ({first_line(e)})") from None
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        return "torch"
    return "zip"


def _state_dict_in(obj: Any) -> tuple[dict | None, str]:
    def tensors_only(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if tensors_only(obj):
        return dict(obj), ""
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if tensors_only(obj.get(key)):
                return dict(obj[key]), f"state_dict found under the checkpoint key {key!r}"
    return None, ""


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(map(repr, list(obj)[:6])) + (", ..." if len(obj) > 6 else "")
        return f"a dict without model tensors (keys: {keys})" if obj else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _from_object(path: Path, obj: Any, trusted: bool) -> LoadedModel:
    if isinstance(obj, nn.Module):
        kind = "graphmodule" if isinstance(obj, fx.GraphModule) else "module"
        return LoadedModel(str(path), kind, obj, "loaded with full unpickling (--trust)" if trusted else "")
    sd, note = _state_dict_in(obj)
    if sd is not None:
        return LoadedModel(str(path), "state_dict", sd, note)
    raise BadModelFile(path, f"holds {_describe(obj)}, not a model or a state_dict")


def _unsafe_reason(e: BaseException) -> str:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if m:
        return f"it needs {m.group(1)}"
    return first_line(e)


def _torch_load(path: Path, trust: bool) -> LoadedModel:
    import pickle
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _from_object(path, obj, trusted=False)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) and "Unsupported global" not in str(e):
            raise BadModelFile(path, f"corrupt pickle ({first_line(e)})") from None
        if not trust:
            raise UnsafeFile(str(path), _unsafe_reason(e)) from None
        reason = e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:
        raise BadModelFile(path, f"truncated or corrupt torch file ({first_line(e)})") from None
    # trust=True and the safe loader refused: the user vouched for this file
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BadModelFile(path, f"cannot unpickle even with --trust ({first_line(e)}; "
                                 f"the safe loader said: {_unsafe_reason(reason)})") from None
    return _from_object(path, obj, trusted=True)


def load_model_file(path: str | os.PathLike, trust: bool = False) -> LoadedModel:
    """Open `path` and return what it holds, never running an untrusted pickle's code.

    Raises:
        BadModelFile: missing, not a regular file (a directory, a FIFO, a device: refused before
            opening, as reading one would hang), empty, truncated, corrupt, or not a model.
        UnsafeFile: a pickled module (or any pickle needing code) and ``trust=False``.
        SurgeryError: a compact archive whose tensors expand past surgery.load's default limit.
    """
    p = Path(path)
    regular_file(p)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise BadModelFile(p, f"cannot read ({e.strerror or first_line(e)})") from None
    if not head:
        raise BadModelFile(p, "empty file (0 bytes)")
    if head.startswith(COMPACT_MAGIC):
        return _load_compact(p)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        kind = _zip_kind(p)
        if kind == "torchscript":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return LoadedModel(str(p), "torchscript", torch.jit.load(str(p), map_location="cpu"))
            except Exception as e:
                raise BadModelFile(p, f"truncated or corrupt TorchScript archive ({first_line(e)})") from None
        if kind == "torch":
            return _torch_load(p, trust)
        raise BadModelFile(p, "a zip archive that is neither TorchScript nor a torch.save file")
    if head[:1] == b"\x80":  # a pickle protocol header: torch's legacy format or a bare pickle
        return _torch_load(p, trust)
    raise BadModelFile(p, "not a model file: expected a TorchScript archive, a torch.save file "
                          "(state_dict or pickled module) or a surgery compact archive")


def _load_compact(p: Path) -> LoadedModel:
    try:
        obj = load_archive(str(p))
    except BadModelFile as e:
        raise BadModelFile(p, f"truncated or corrupt compact archive ({e.problem})") from None
    except SurgeryError:  # past the expansion limit: its message names the file, tensor and fix
        raise
    except Exception as e:
        raise BadModelFile(p, f"truncated or corrupt compact archive ({first_line(e)})") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(str(p), "compact", obj)
    sd, note = _state_dict_in(obj)
    if sd is None:
        raise BadModelFile(p, f"compact archive holds {_describe(obj)}")
    return LoadedModel(str(p), "compact", sd, note)
