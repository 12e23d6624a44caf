"""What a deployed ``.pt2`` or ``.onnx`` file holds, read without unpickling anything
(``torch.export.load`` unpickles): parameters, operators, inputs and outputs. ``surgery inspect``
shows these; :mod:`surgery.io.deploy` writes and verifies the files."""
from __future__ import annotations

import collections
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadModelFile, first_line
from .archive import regular_file
from .deploy import _need_onnx

__all__ = ["DeployedFile", "read_pt2", "read_onnx"]


@dataclass
class DeployedFile:
    """What a .pt2 or .onnx file holds, read without unpickling anything."""

    path: str
    format: str
    params: int
    buffers: int
    ops: dict[str, int] = field(default_factory=dict)
    inputs: list[tuple[str, list, str]] = field(default_factory=list)   # (name, shape, dtype)
    outputs: list[tuple[str, list, str]] = field(default_factory=list)

    def table(self) -> str:
        def io(rows: list) -> str:
            return ", ".join(f"{n} {tuple(s)} {d}" for n, s, d in rows) or "-"
        top = sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))
        lines = [f"{self.path} ({self.format}): {self.params:,} parameters, {self.buffers:,} buffer elements",
                 f"inputs:  {io(self.inputs)}", f"outputs: {io(self.outputs)}",
                 f"{sum(self.ops.values())} ops: " + ", ".join(f"{k} x{v}" for k, v in top)]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_DTYPES = {6: "float16", 7: "float32", 8: "float64", 13: "bfloat16", 4: "int64", 3: "int32", 12: "bool", 1: "uint8"}


def _size(s: dict) -> Any:
    """A size: an int, or the name of the symbol a dynamic axis has ("s0")."""
    if "as_int" in s:
        return s["as_int"]
    expr = s.get("as_expr", {}).get("expr_str", "?")
    found = re.match(r"Symbol\('(\w+)'", expr)
    return found.group(1) if found else expr


def read_pt2(path: str | os.PathLike) -> DeployedFile:
    """Summarise a ``torch.export.save`` archive from its JSON members alone (no pickle)."""
    regular_file(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            model = next(n for n in names if n.endswith("models/model.json"))
            weights = next((n for n in names if n.endswith("weights/model_weights_config.json")), None)
            program = json.loads(z.read(model))
            config = json.loads(z.read(weights))["config"] if weights else {}
    except (zipfile.BadZipFile, StopIteration, KeyError, json.JSONDecodeError) as e:
        raise BadModelFile(path, f"not a torch.export archive ({first_line(e) or type(e).__name__})") from None
    numel = collections.Counter()
    for entry in config.values():
        n = 1
        for s in entry["tensor_meta"]["sizes"]:
            n *= s.get("as_int", 1)
        numel["params" if entry.get("is_param") else "buffers"] += n
    graph = program["graph_module"]["graph"]
    ops = collections.Counter(str(n["target"]).replace("torch.ops.", "") for n in graph["nodes"])
    values = graph["tensor_values"]
    user = [s["user_input"]["arg"]["as_tensor"]["name"] for s in program["graph_module"]["signature"]["input_specs"]
            if "user_input" in s and "as_tensor" in s["user_input"]["arg"]]

    def describe(name: str) -> tuple[str, list, str]:
        meta = values.get(name, {})
        return name, [_size(s) for s in meta.get("sizes", [])], _DTYPES.get(meta.get("dtype"), str(meta.get("dtype")))
    outs = [o["as_tensor"]["name"] for o in graph["outputs"] if "as_tensor" in o]
    return DeployedFile(str(path), "pt2", numel["params"], numel["buffers"], dict(ops),
                        [describe(n) for n in user], [describe(n) for n in outs])


def read_onnx(path: str | os.PathLike) -> DeployedFile:
    """Summarise an ONNX file with ``onnx`` (protobuf, no pickle): floating-point initializers
    count as parameters (the exporter folds BatchNorm into the convolution before it), integer
    ones (shapes, indices) as buffers."""
    _need_onnx(path)
    regular_file(path)
    import onnx
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadModelFile(path, f"not an ONNX model ({first_line(e)})") from None
    g = m.graph
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    sizes = [(t.data_type in floats, int(np.prod(t.dims)) if t.dims else 1) for t in g.initializer]
    params = sum(n for is_float, n in sizes if is_float)  # weights; integer initializers are shapes, indices
    init = {t.name for t in g.initializer}

    def describe(v: Any) -> tuple[str, list, str]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
    ops = collections.Counter(n.op_type for n in g.node)
    return DeployedFile(str(path), "onnx", params, sum(n for is_float, n in sizes if not is_float), dict(ops),
                        [describe(v) for v in g.input if v.name not in init], [describe(v) for v in g.output])
