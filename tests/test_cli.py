"""The `surgery` command, run for real in a subprocess."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).with_name("surgery")


def run(*args: str, cwd: Path | None = None, script: bool = False) -> subprocess.CompletedProcess:
    """Run `surgery ARGS` (this checkout's code) and capture its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "surgery"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2), 1))


N_PARAMS = 80 + 16 + 1290


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for f in fragments:
        assert f in lines[0]


def test_console_script_inspects_a_state_dict(tmp_path):
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT} (package not installed in this environment)")
    torch.save(Net().state_dict(), tmp_path / "sd.pt")
    proc = run("inspect", tmp_path / "sd.pt", "--json", script=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "state_dict" and doc["totals"]["params"] == N_PARAMS
    assert doc["totals"]["buffers"] == 8 + 8 + 1


def test_inspect_torchscript_json_totals_equal_parameter_count(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Net()), str(tmp_path / "ts.pt"))
    proc = run("inspect", tmp_path / "ts.pt", "--json", "--input-shape", "1,1,8,8")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "torchscript"
    assert doc["totals"]["params"] == N_PARAMS == sum(r["params"] for r in doc["rows"])
    assert doc["totals"]["macs"] == 8 * 64 * 9 + 10 * 128
    assert [r["name"] for r in doc["rows"]] == ["conv", "bn", "fc"]


def test_inspect_trusted_graphmodule_table_shows_masks(tmp_path):
    from passes import Identity
    gm = surgery.compress(Net(), passes=[Identity(select=nn.Conv2d)], example_inputs=(torch.randn(1, 1, 8, 8),))
    torch.save(gm, tmp_path / "gm.pt")
    refused = run("inspect", tmp_path / "gm.pt")
    assert_one_line_error(refused, "--trust", "refusing to unpickle")
    proc = run("inspect", tmp_path / "gm.pt", "--trust", "--input-shape", "1,1,8,8", "--groups")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(graphmodule)" in out and "OnesMask" in out and "8/8" in out and f"{N_PARAMS:,}" in out
    assert "channel groups" in out


def test_inspect_compact_archive(tmp_path):
    net = Net()
    with torch.no_grad():
        net.fc.weight[:, ::2] = 0
    surgery.save(net, tmp_path / "net.surg", compact=True)
    proc = run("inspect", tmp_path / "net.surg", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "compact" and doc["totals"]["params"] == N_PARAMS
    assert next(r for r in doc["rows"] if r["name"] == "fc")["zeros"] == 640


class Boom:
    """Unpickling this creates a file: proof of whether a loader ran the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_untrusted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Boom(marker)}, tmp_path / "evil.pt")
    proc = run("inspect", tmp_path / "evil.pt")
    assert_one_line_error(proc, "refusing to unpickle", "--trust", "evil.pt")
    assert not marker.exists()
    # the same file with --trust really runs its code: the test above proves something
    trusted = run("inspect", tmp_path / "evil.pt", "--trust")
    assert trusted.returncode == 2 and marker.exists()


def test_missing_empty_and_truncated_files_exit_2_with_one_line(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "sd.pt")
    data = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, fragment in [("missing.pt", "no such file"), ("empty.pt", "empty file"),
                           ("truncated.pt", "truncated or corrupt")]:
        assert_one_line_error(run("inspect", tmp_path / name), name, fragment)


def test_usage_errors(tmp_path):
    (tmp_path / "r.toml").write_text('[[passes]]\npass = "Nope"\n')
    proc = run("compress", "torch.nn:Linear(in_features=4, out_features=2)", "--recipe", tmp_path / "r.toml",
               "--input-shape", "1,4", "-o", tmp_path / "out.pt")
    assert_one_line_error(proc, "unknown pass 'Nope'", "valid passes:", "Identity")
    proc = run("compress", "torch.nn:Nope", "--recipe", tmp_path / "r.toml", "--input-shape", "1,4",
               "-o", tmp_path / "out.pt")
    assert_one_line_error(proc, "torch.nn has no callable 'Nope'")


needs_shrink = pytest.mark.skipif(not hasattr(surgery, "export"), reason="surgery.export / passes.Shrink not in this build")


@needs_shrink
@pytest.mark.slow
def test_compress_resnet18_with_weights_is_smaller_and_exact(tmp_path):
    import torchvision
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-default weights, so that loading --weights matters
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    out = tmp_path / "small.pt"
    proc = run("compress", "torchvision.models:resnet18", "--weights", tmp_path / "r18.pt",
               "--recipe", ROOT / "examples" / "resnet18_prune_half.toml", "--input-shape", "1,3,32,32",
               "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["before"]["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert doc["after"]["totals"]["params"] < 0.5 * doc["before"]["totals"]["params"]
    assert doc["after"]["totals"]["macs"] < doc["before"]["totals"]["macs"]
    assert doc["check"]["ok"] and doc["check"]["max_rel_diff"] < 1e-4
    # the exported file is plain TorchScript, and inspect reads it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(out))
    assert sum(p.numel() for p in ts.parameters()) == doc["after"]["totals"]["params"]
    proc = run("inspect", out, "--json")
    assert json.loads(proc.stdout)["totals"]["params"] == doc["after"]["totals"]["params"]


@needs_shrink
def test_compress_a_trusted_masked_graphmodule_file(tmp_path):
    from passes import ChannelPrune
    gm = surgery.compress(Net(), [ChannelPrune(ratio=0.5)], example_inputs=(torch.randn(1, 1, 8, 8),))
    torch.save(gm, tmp_path / "masked.pt")
    args = ["compress", tmp_path / "masked.pt", "--recipe", ROOT / "examples" / "shrink.toml",
            "--input-shape", "1,1,8,8", "-o", tmp_path / "small.pt"]
    assert_one_line_error(run(*args), "--trust")
    proc = run(*args, "--trust")
    assert proc.returncode == 0, proc.stderr
    assert "(after, torchscript)" in proc.stdout and "max rel diff" in proc.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(tmp_path / "small.pt"))
    # conv keeps 4 of 8 channels: conv 1*4*9+4, bn 2*4, fc 10*4*16+10
    assert sum(p.numel() for p in ts.parameters()) == 40 + 8 + 650
    proc = run(*args, "--trust", "--freeze", "-o", tmp_path / "frozen.pt")  # the last -o wins
    assert proc.returncode == 0, proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.load(str(tmp_path / "frozen.pt"))
    x = torch.randn(2, 1, 8, 8)
    assert list(frozen.parameters()) == []  # inference-only: weights are constants, BatchNorm folded
    torch.testing.assert_close(frozen(x), ts(x), rtol=1e-5, atol=1e-6)


@needs_shrink
def test_demo_end_to_end_short(tmp_path):
    proc = run("demo", "--epochs", "3", "-o", tmp_path / "digits.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for fragment in ("CNN (before)", "DAM-masked", "shrunk, TorchScript", "after / before", "CPU latency",
                     "$ surgery inspect", "(torchscript)"):
        assert fragment in out
    assert "train CNN" in proc.stderr and "epoch" in proc.stderr  # tqdm progress bars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(tmp_path / "digits.pt"))
    assert sum(p.numel() for p in ts.parameters()) < 19_338   # DAM closed channels; Shrink removed them
    assert ts(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_compress_writes_pt2_and_onnx_and_inspect_reads_them(tmp_path, suffix):
    pytest.importorskip("onnxruntime")
    out = tmp_path / f"small{suffix}"
    proc = run("compress", "torchvision.models:resnet18(num_classes=10)", "--recipe",
               ROOT / "examples" / "resnet18_prune_half.toml", "--input-shape", "1,3,32,32", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["check"]["ok"] and doc["check"]["max_rel_diff"] < 1e-4 and doc["check"]["bytes"] == out.stat().st_size
    kept = doc["after"]["totals"]["params"]
    assert kept < 0.5 * doc["before"]["totals"]["params"]
    proc = run("inspect", out, "--json")  # read without unpickling
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == suffix[1:]
    if suffix == ".pt2":
        assert info["params"] == kept and info["ops"]["aten.conv2d.default"] == 20
    else:  # ONNX folds each BatchNorm's scale and shift into its convolution (exact counts: test_deploy)
        assert info["params"] < kept and info["ops"]["Conv"] == 20 and "BatchNormalization" not in info["ops"]
    assert info["inputs"][0][1][1:] == [3, 32, 32] and isinstance(info["inputs"][0][1][0], str)  # a dynamic batch
    assert info["outputs"][0][1][1:] == [10]


def _without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that fails the moment anything imports torch."""
    guard = ("import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch' or name.startswith('torch.'):\n"
             "            raise ImportError('torch imported')\n"
             "sys.meta_path.insert(0, _NoTorch())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", guard + code], capture_output=True, text=True, env=env, timeout=120)


def test_version_help_and_file_errors_import_no_torch(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code = ("from surgery.app.cli import main\n"
            "for argv in (['--version'], ['--help'], ['inspect', %r], ['inspect', %r], "
            "['compress', 'torchvision.models:resnet18', '--recipe', %r, '--input-shape', '1,3,8,8', '-o', 'x.pt']):\n"
            "    try:\n        print('rc', main(argv))\n    except SystemExit as e:\n        print('exit', e.code)\n"
            % (str(empty), str(tmp_path / "missing.pt"), str(tmp_path / "missing.toml")))
    proc = _without_torch(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"surgery {surgery.__version__}"
    assert "examples:" in proc.stdout and "surgery inspect model.pt" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith(("rc", "exit"))] == \
        ["exit 0", "exit 0", "rc 2", "rc 2", "rc 2"]
    assert proc.stderr.splitlines() == [f"surgery: error: {empty}: empty file (0 bytes)",
                                        f"surgery: error: {tmp_path / 'missing.pt'}: cannot read (no such file)",
                                        f"surgery: error: {tmp_path / 'missing.toml'}: cannot read (no such file)"]


def test_import_surgery_is_lazy_and_keeps_its_functions():
    proc = _without_torch("import surgery\nprint(surgery.__version__, sorted(surgery.__all__)[:2])")
    assert proc.returncode == 0, proc.stderr
    import importlib
    importlib.import_module("surgery.shrink.apply")  # the submodules bound to the package's attributes ...
    importlib.import_module("surgery.capture")
    assert callable(surgery.shrink) and callable(surgery.capture)  # ... which still read as the functions
    from surgery import shrink
    assert shrink is surgery.shrink is importlib.import_module("surgery.shrink").shrink
    with pytest.raises(AttributeError, match="module 'surgery' has no attribute 'nonexistent'"):
        surgery.nonexistent


@pytest.mark.parametrize("recipe, culprit", [("dam_masks.toml", "#1 (DAM) learns its masks in training"),
                                             ("magnitude_agp.toml", "#1 (MagnitudePrune) reaches its sparsity over "
                                                                    "training steps")])
def test_recipes_that_need_training_are_refused(tmp_path, recipe, culprit):
    """Exporting them here would write the untrained model (0% sparse, every mask open)."""
    out = tmp_path / "x.pt"
    proc = run("compress", "torchvision.models:resnet18", "--recipe", ROOT / "examples" / recipe,
               "--input-shape", "1,3,32,32", "-o", out)
    assert_one_line_error(proc, culprit, "which the command line does not run")
    assert not out.exists()


def _in_pty(cmd: list[str]) -> tuple[str, str, int]:
    """Run `cmd` with stderr on a pseudo-terminal: (stdout, stderr, exit status)."""
    import pty
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=300)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    return stdout, err.decode().replace("\r\n", "\n"), proc.returncode


def test_long_work_says_what_it_is_doing_on_a_terminal_only():
    """surgery.progress: a stage still running after DELAY prints a line, with its time when done
    (DELAY 0 here); nothing when stderr is not a terminal."""
    code = ("import torch, surgery, surgery.progress as P\nfrom passes import ChannelPrune, Shrink\nP.DELAY = 0.0\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()\n"
            "surgery.compress(m, [ChannelPrune(0.5), Shrink()], (torch.randn(2, 4),))\n")
    _, err, status = _in_pty([sys.executable, "-c", code])
    assert status == 0, err
    assert [line.split(" ...")[0] for line in err.splitlines()] == \
        ["surgery: capture Sequential", "surgery: ChannelPrune", "surgery: Shrink"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 0 and plain.stderr == ""


def test_compress_in_a_terminal_shows_its_stages_and_plots_the_widths(tmp_path):
    """stderr a pseudo-terminal: one line per stage with its time; the --plot image is written."""
    out, image = tmp_path / "small.pt", tmp_path / "widths.png"
    stdout, err, code = _in_pty([sys.executable, "-m", "surgery", "compress", "torchvision.models:resnet18",
                                 "--recipe", str(ROOT / "examples" / "resnet18_prune_half.toml"), "--input-shape",
                                 "1,3,32,32", "-o", str(out), "--plot", str(image)])
    assert code == 0, err
    stages = [line.split(" ...")[0] for line in err.splitlines()]
    assert stages == ["surgery: build torchvision.models:resnet18", "surgery: count parameters and MACs",
                      "surgery: capture and ChannelPrune", "surgery: Shrink (checked against the masked model)",
                      f"surgery: export {out} and verify it", "surgery: compare with the masked model"]
    assert all(re.search(r" \.\.\. \d+\.\d s$", line) for line in err.splitlines())
    assert "26.1% of before" in stdout
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quiet = run("compress", "torchvision.models:resnet18", "--recipe", ROOT / "examples" / "resnet18_prune_half.toml",
                "--input-shape", "1,3,32,32", "-o", out, "--quiet")
    assert quiet.stderr == ""  # not a terminal, and --quiet: silent


def test_plot_needs_what_it_draws(tmp_path):
    torch.save(Net().state_dict(), tmp_path / "sd.pt")
    assert_one_line_error(run("inspect", tmp_path / "sd.pt", "--plot", tmp_path / "x.png"),
                          "--plot draws the channel groups, which need --input-shape")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\npass = "ChannelPrune"\nratio = 0.5\n')
    assert_one_line_error(run("compress", "torchvision.models:resnet18", "--recipe", recipe, "--input-shape",
                              "1,3,32,32", "-o", tmp_path / "x.pt", "--plot", tmp_path / "x.png"),
                          "--plot draws what Shrink removed, and", "has no Shrink pass")


def test_inspect_plots_the_groups_of_a_model(tmp_path):
    gm = surgery.capture(Net().eval(), (torch.randn(1, 1, 8, 8),))  # a GraphModule pickles without Net's code
    torch.save(gm, tmp_path / "net.pt")
    proc = run("inspect", tmp_path / "net.pt", "--trust", "--input-shape", "1,1,8,8", "--plot", tmp_path / "g.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert "channel groups:" not in proc.stdout  # drawn, not listed (that is --groups)
