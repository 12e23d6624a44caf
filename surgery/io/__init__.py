"""Files in and out: safe model loading (:mod:`~surgery.io.files`), export with a reload check
(:mod:`~surgery.io.export`; .pt2 and ONNX in :mod:`~surgery.io.deploy`), the compact archive
(:mod:`~surgery.io.archive`), the layer table of ``surgery inspect`` (:mod:`~surgery.io.inspect`)
and MAC counting (:mod:`~surgery.io.macs`).
"""
from .archive import load, save
from .deploy import load_deployed, verify_export
from .deployed import read_onnx, read_pt2
from .export import export, load_torchscript
from .files import load_model_file
from .inspect import summary
from .macs import count_macs

__all__ = ["load", "save", "export", "load_torchscript", "load_model_file", "summary", "count_macs", "verify_export",
           "load_deployed", "read_pt2", "read_onnx"]
