"""Export: TorchScript, reloaded and verified; the file runs where surgery is not installed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.errors import ExportFailure
from surgery.verify import run_eval


def _small_model():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 12, 12)
    return surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,)), x


def test_export_returns_path_and_reloads(tmp_path):
    small, x = _small_model()
    path = surgery.export(small, tmp_path / "small.pt", example_inputs=(x,))
    assert path == tmp_path / "small.pt" and path.exists()
    loaded = surgery.load_torchscript(path)
    torch.testing.assert_close(loaded(x), run_eval(small, (x,)))
    assert small.training is True or small.training is False  # the caller's flags are left as they were


def test_export_runs_without_surgery(tmp_path):
    small, x = _small_model()
    path = surgery.export(small, tmp_path / "small.pt", example_inputs=(x,))
    torch.save({"x": x, "y": run_eval(small, (x,))}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        # hide surgery and passes: any import of them now fails
        sys.path = [p for p in sys.path if p not in ("", ".", {os.getcwd()!r}) and "wt/" not in p]
        sys.modules["surgery"] = None
        sys.modules["passes"] = None
        try:
            import surgery
            raise SystemExit("surgery is still importable")
        except ImportError:
            pass
        import torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        m = torch.jit.load({str(path)!r})
        torch.testing.assert_close(m(io["x"]), io["y"])
        print("ok", [k for k in sys.modules if k.startswith(("surgery", "passes")) and sys.modules[k]])
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok []"


def test_trace_fallback_and_failure_names_the_file(tmp_path):
    class NotScriptable(nn.Module):
        def forward(self, x):
            return x * len([d for d in x.shape])  # comprehension over shape: script fails, trace works

    path = surgery.export(NotScriptable(), tmp_path / "t.pt", example_inputs=(torch.randn(2, 3),))
    assert torch.jit.load(str(path))(torch.randn(2, 3)).shape == (2, 3)

    class Random(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)  # never reproduces itself

    with pytest.raises(ExportFailure, match="r.pt"):
        surgery.export(Random(), tmp_path / "r.pt", example_inputs=(torch.randn(2, 3),))
    assert not (tmp_path / "r.pt").exists()


def test_export_needs_inputs(tmp_path):
    with pytest.raises(ExportFailure, match="example_inputs"):
        surgery.export(nn.Linear(2, 2), tmp_path / "x.pt", None)


def test_frozen_export_reproduces_the_model_with_and_without_onednn_fusion(tmp_path):
    small, x = _small_model()
    path = surgery.export(small, tmp_path / "frozen.pt", example_inputs=(x,), freeze=True)
    loaded = torch.jit.load(str(path))
    assert list(loaded.parameters()) == []  # frozen: the weights are constants of the graph
    ref = run_eval(small, (x,))
    torch.testing.assert_close(loaded(x), ref)
    was = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.no_grad():
            outs = [loaded(x) for _ in range(4)]  # the profiling executor fuses after its first runs
    finally:
        torch.jit.enable_onednn_fusion(was)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
