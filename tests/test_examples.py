"""Every example script runs (small settings) and prints what its docstring says it prints."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script, small settings, lines its output must match (in order)
CASES = [
    ("prune_finetune_torchvision.py", ["--epochs", "1", "--finetune-epochs", "1", "--train-size", "256"],
     [r"dense: 11,181,642 params, 37\.0M MACs, test accuracy \d+\.\d%",
      r"pruned, one shot: [\d,]+ params, [\d.]+M MACs \(0\.(49|50|51) of dense\), test accuracy",
      r"fine-tuned: test accuracy \d+\.\d%", r"exported .*\.pt2 \([\d,]+ bytes\)"]),
    ("prune_timm.py", ["--model", "resnet10t", "--size", "64"],
     [r"resnet10t: [\d,]+ -> [\d,]+ params \(0\.\d\d\), [\d.]+G -> [\d.]+G MACs",
      r"max rel. difference to the masked model on a fresh input: \d\.\de-0[5-9]",
      r"exported .*\.onnx \([\d,]+ bytes\), run by ONNX Runtime"]),
    ("prune_hf.py", ["--layers", "2", "--hidden", "64"],
     [r"BertForSequenceClassification: [\d,]+ -> [\d,]+ params \(0\.\d\d\)",
      r"heads per layer: \[2, 2\]; MLP widths: \[128, 128\]", r"reloaded from .*: logits equal: True"]),
    ("dam_shrink.py", ["--epochs", "3"],
     [r"dense CNN: 10,026 params, test accuracy",
      r"DAM keeps \d+ of 48 channels \(dam_conv1: \d+/16, dam_conv2: \d+/32\)",
      r"shrunk: [\d,]+ params, test accuracy (\d+\.\d)% \(masked \1%\)", r"exported .*\.pt"]),
    ("activation_compression.py", ["--epochs", "1"],
     [r"saved for backward per step: [\d.]+ MiB -> [\d.]+ MiB \((8\d|9\d)% less\)",
      r"test accuracy: plain \d+\.\d%, compressed \d+\.\d%"]),
    ("deep_compression.py", ["--epochs", "4"],
     [r"dense: 85,002 params, 340,008 bytes as float32", r"pruned to 90% zeros \(AGP\): test accuracy",
      r"\+ 4-bit weight sharing: test accuracy",
      r"stored as in Deep Compression: [\d,]+ bytes \(\d+\.\dx smaller\), .* reloads bit for bit: True"]),
]


@pytest.mark.parametrize("script, args, expected", CASES, ids=[c[0] for c in CASES])
def test_example_runs_and_prints_what_it_says(tmp_path, script, args, expected):
    doc = (EXAMPLES / script).read_text()
    assert f"python examples/{script}" in doc  # its docstring shows how to run it
    out = ["-o", str(tmp_path / "out")] if "-o" in doc else []
    if out and script.startswith(("prune_timm", "prune_finetune")):
        out[1] += ".onnx" if "timm" in script else ".pt2"
    elif out and script == "dam_shrink.py":
        out[1] += ".pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args, *out], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == len(expected), proc.stdout
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), (pattern, line)  # each line starts as the docstring shows
