"""The end-to-end demo (``surgery demo``, ``make demo``): digits CNN -> DAM masks -> Shrink -> TorchScript.

On scikit-learn's bundled digits (8x8 grey images, 10 classes, fixed split): train a small
CNN, insert DAM channel masks, train with their penalty so that channels switch off, shrink
the masked model into a physically smaller one, export it to TorchScript, then print accuracy,
parameters, MACs and CPU latency before and after, and the inspect table of the exported file.

    >>> from surgery.app.demo import run_demo
    >>> result = run_demo(output="/tmp/digits_small.pt", epochs=2)  # doctest: +SKIP
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SurgeryError
from ..verify import eval_mode

__all__ = ["DigitsCNN", "digits_data", "run_demo", "latency_ms"]

# epochs per phase: baseline training, then training with the DAM penalty
BASE_EPOCHS = 20
DAM_EPOCHS = 20
DAM_LAM = 0.2
BATCH = 64


class DigitsCNN(nn.Module):
    """Three 3x3 conv blocks and a linear head for 1x8x8 digits (about 0.45M MACs per image)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.head = nn.Linear(2 * w * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


@dataclass
class Digits:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_data(seed: int = 0) -> Digits:
    """load_digits as 1x8x8 float images in [0, 1]; a stratified 75/25 split fixed by `seed`."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SurgeryError("the demo needs scikit-learn for its digits data: pip install 'surgery[dev]'") from e
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)

    def images(a):
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    return Digits(images(xtr), torch.tensor(ytr), images(xte), torch.tensor(yte))


@torch.no_grad()
def accuracy(model: Any, x: Tensor, y: Tensor) -> float:
    with eval_mode(model):
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, data: Digits, epochs: int, desc: str, *, lr: float = 1e-2,
          mask_lr: float = 5e-2, penalty: bool = False, seed: int = 0) -> None:
    """Adam on cross-entropy (+ surgery.penalty when `penalty`), one tqdm bar per phase."""
    from tqdm import tqdm

    import surgery
    gen = torch.Generator().manual_seed(seed)
    # mask parameters (DAM's beta) get their own, larger step: Adam moves each parameter by
    # about lr per step, and a gate must travel a few units to close channels in a short run
    mask_params = {id(p) for m in surgery.masks(model).values() for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in mask_params], "lr": lr}]
    if mask_params:
        groups.append({"params": [p for p in model.parameters() if id(p) in mask_params], "lr": mask_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    n = len(data.x_train)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        model.train()
        for idx in torch.randperm(n, generator=gen).split(BATCH):
            ce = loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if penalty:
                reg = surgery.penalty(model)  # DAM's is linear in beta: negative once gates close
                loss = loss + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            if penalty:
                surgery.step(model)
        sched.step()
        post = {"cross-entropy": f"{ce.item():.3f}", "test acc": f"{accuracy(model, data.x_test, data.y_test):.3f}"}
        if penalty:
            post["penalty"] = f"{reg.item():+.3f}"
            kept = [m.kept() for m in surgery.masks(model).values()]
            post["channels kept"] = f"{sum(int(k.sum()) for k in kept)}/{sum(k.numel() for k in kept)}"
        bar.set_postfix(post)


@torch.no_grad()
def latency_ms(model: Any, x: Tensor, runs: int = 300, warmup: int = 30) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, no grad)."""
    if hasattr(model, "eval"):
        model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _table(rows: list[list[str]]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join([fmt[0], "  ".join("-" * x for x in w), *fmt[1:]])


def run_demo(output: str = "digits_small.pt", epochs: int | None = None, seed: int = 0,
             lam: float = DAM_LAM, threads: int = 1, out=None) -> dict[str, Any]:
    """Run the whole demo, print its report to `out` (stdout) and return the figures.

    `threads` defaults to 1: these layers are so small that a second thread costs more in
    synchronisation than it saves, and on a busy machine it can make training several times
    slower."""
    import surgery
    try:
        from passes import DAM, Shrink  # noqa: F401  (checked here, used in _run)
    except ImportError as e:
        raise SurgeryError(f"the demo needs passes.DAM and passes.Shrink, which this build lacks ({e})") from None
    if not hasattr(surgery, "export"):
        raise SurgeryError("the demo needs surgery.export (TorchScript export), which this build lacks")
    out = out or sys.stdout
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _run(output, epochs, seed, lam, out)
    finally:
        torch.set_num_threads(previous_threads)


def _run(output: str, epochs: int | None, seed: int, lam: float, out) -> dict[str, Any]:
    import surgery
    from passes import DAM, Shrink

    from ..io.files import load_model_file
    from ..io.inspect import human, summary
    base_epochs = epochs if epochs is not None else BASE_EPOCHS
    dam_epochs = epochs if epochs is not None else DAM_EPOCHS
    torch.manual_seed(seed)
    data = digits_data(seed)
    example = (data.x_test[:1],)
    print(f"digits: {len(data.x_train)} training and {len(data.x_test)} test images of 1x8x8, "
          f"{torch.get_num_threads()} CPU thread(s)", file=out, flush=True)

    net = DigitsCNN()
    t0 = time.perf_counter()
    train(net, data, base_epochs, "1/3 train CNN", seed=seed)
    masked = surgery.compress(net, passes=[DAM(select=nn.Conv2d, lam=lam)], example_inputs=example)
    train(masked, data, dam_epochs, "2/3 train with DAM penalty", lr=5e-3, penalty=True, seed=seed + 1)
    masked.eval()
    kept = {name: m.kept() for name, m in surgery.masks(masked).items()}
    print(f"DAM keeps {sum(int(k.sum()) for k in kept.values())} of {sum(k.numel() for k in kept.values())} "
          f"channels ({', '.join(f'{n}: {int(k.sum())}/{k.numel()}' for n, k in kept.items())})", file=out, flush=True)
    small = surgery.compress(masked, passes=[Shrink()], example_inputs=example)
    print("3/3 shrink and export", file=out, flush=True)
    surgery.export(small, output, example)
    exported = load_model_file(output).model
    wall = time.perf_counter() - t0

    # latency compares like with like: the baseline is timed as TorchScript too
    with tempfile.TemporaryDirectory() as tmp:
        base_ts = load_model_file(surgery.export(net, Path(tmp) / "before.pt", example)).model
    figures = {}
    for label, model, timed in (("CNN (before)", net, base_ts), ("DAM-masked", masked, masked),
                                ("shrunk, TorchScript", exported, exported)):
        s = summary(model, inputs=example)
        figures[label] = {"accuracy": accuracy(model, data.x_test, data.y_test), "params": s.totals["params"],
                          "macs": s.totals["macs"], "latency_ms": latency_ms(timed, example[0])}
    with torch.no_grad():
        diff = float((masked(data.x_test) - exported(data.x_test)).abs().max())
    before = figures["CNN (before)"]
    rows = [["model", "test accuracy", "parameters", "MACs", "CPU latency (batch 1)"]]
    for label, f in figures.items():
        rows.append([label, f"{100 * f['accuracy']:.2f}%", f"{f['params']:,}", human(f["macs"]),
                     f"{f['latency_ms']:.3f} ms"])
    after = figures["shrunk, TorchScript"]
    rows.append(["after / before", f"{100 * (after['accuracy'] - before['accuracy']):+.2f} pts",
                 f"{after['params'] / before['params']:.1%}", f"{after['macs'] / before['macs']:.1%}",
                 f"{before['latency_ms'] / after['latency_ms']:.1f}x faster"])
    print("", _table(rows), "", sep="\n", file=out)
    print(f"latency: median of 300 batch-1 forward passes on {torch.get_num_threads()} thread(s); before and "
          "after as TorchScript, the masked model as an eager GraphModule", file=out)
    print(f"exported {output}: max abs difference from the masked model on the test set {diff:.2g}; "
          f"training + surgery took {wall:.0f} s", file=out)
    print(f"\n$ surgery inspect {output} --input-shape 1,1,8,8", file=out)
    print(summary(exported, inputs=example, source=output, kind="torchscript").table(), file=out, flush=True)
    return {"figures": figures, "max_abs_diff": diff, "output": output, "seconds": wall}
