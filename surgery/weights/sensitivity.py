"""Sensitivity analyses: how much a metric suffers when one tensor alone is pruned (at each
sparsity) or weight-shared (at each bit width). Every probe restores the weights bit-exactly.

Example::

    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = torch.randn(32, 8)
    >>> ref = net(x).detach()
    >>> evaluate = lambda m: {"mse": float(((m(x).detach() - ref) ** 2).mean())}
    >>> table = surgery.sensitivity(net, evaluate, sparsities=(0.5, 0.9), progress=False)
    >>> [row["tensor"] for row in table.rows][:2]
    ['0.weight', '0.weight']
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError
from ..select import Selector
from .kmeans import INITS, share_tensor
from .tensors import magnitude_mask, weight_tensors

__all__ = ["sensitivity", "bits_analysis", "AnalysisTable"]

_DEFAULT_SELECT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class AnalysisTable:
    """Rows of ``{"tensor", <knob>, metric...}``; `baseline` holds the unmodified metrics."""

    knob: str  # "sparsity" or "bits"
    rows: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.baseline)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One line per probe, plus the baseline as tensor "<baseline>" at knob 0 (sparsity) or 32 (bits)."""
        base = {"tensor": "<baseline>", self.knob: 0.0 if self.knob == "sparsity" else 32, **self.baseline}
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["tensor", self.knob, *self.metrics])
            w.writeheader()
            for row in [base, *self.rows]:
                w.writerow(row)

    def plot(self, path: str | os.PathLike, metric: str | None = None, title: str | None = None) -> None:
        """A PNG with one curve per tensor: `metric` (the first one by default) against the knob,
        with the baseline as a dashed line."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = metric or self.metrics[0]
        if metric not in self.baseline:
            raise SurgeryError(f"plot: no metric {metric!r}; have {', '.join(self.metrics)}")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for tensor in dict.fromkeys(r["tensor"] for r in self.rows):
            pts = sorted((r[self.knob], r[metric]) for r in self.rows if r["tensor"] == tensor)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=tensor)
        ax.axhline(self.baseline[metric], color="gray", ls="--", lw=1, label="baseline")
        ax.set_xlabel(self.knob)
        ax.set_ylabel(metric)
        if self.knob == "bits":
            ax.invert_xaxis()
        ax.set_title(title or f"{metric} when one tensor alone is {'pruned' if self.knob == 'sparsity' else 'shared'}")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def to_markdown(self, metric: str | None = None) -> str:
        """Tensors as rows, knob values as columns, `metric` in the cells."""
        metric = metric or self.metrics[0]
        knobs = sorted({r[self.knob] for r in self.rows}, reverse=self.knob == "bits")
        lines = [f"| tensor (baseline {self.baseline[metric]:.4g}) | " + " | ".join(f"{k:g}" for k in knobs) + " |",
                 "|---|" + "---:|" * len(knobs)]
        for tensor in dict.fromkeys(r["tensor"] for r in self.rows):
            cells = {r[self.knob]: r[metric] for r in self.rows if r["tensor"] == tensor}
            lines.append(f"| {tensor} | " + " | ".join(f"{cells[k]:.4g}" if k in cells else "" for k in knobs) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _call(evaluate: Callable[[nn.Module], dict], model: nn.Module) -> dict[str, float]:
    out = evaluate(model)
    if not isinstance(out, dict) or not out:
        raise SurgeryError(f"evaluate(model) must return a non-empty dict of metrics, got {out!r}")
    return {k: float(v) for k, v in out.items()}


def _probe(model: nn.Module, evaluate, select, exclude, knob: str, values: Sequence,
           modify: Callable[[torch.Tensor, Any], torch.Tensor], progress: bool) -> AnalysisTable:
    tensors = weight_tensors(model, select, exclude)
    for name, (mod, attr) in tensors.items():
        if parametrize.is_parametrized(mod, attr):
            raise SurgeryError(f"{knob} analysis: {name} is parametrized (an active mask or codebook); "
                               "run it on surgery.finalize(model)")
    table = AnalysisTable(knob, baseline=_call(evaluate, model))
    probes = [(n, v) for n in tensors for v in values]
    try:
        from tqdm.auto import tqdm
        bar = tqdm(probes, desc=f"{knob} probes", disable=not progress)
    except ImportError:  # tqdm is optional at run time
        bar = probes
    for name, value in bar:
        mod, attr = tensors[name]
        weight = getattr(mod, attr)
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.copy_(modify(saved, value))
            table.rows.append({"tensor": name, knob: value, **_call(evaluate, model)})
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    return table


def sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], dict],
                sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                select: Selector = _DEFAULT_SELECT, exclude: Selector = None, *,
                progress: bool = True) -> AnalysisTable:
    """Prune each selected weight tensor alone to each sparsity (by magnitude), call
    ``evaluate(model) -> dict`` and restore the tensor bit-exactly. Returns an
    :class:`AnalysisTable` (``to_csv``, ``plot``, ``to_markdown``)."""
    for s in sparsities:
        if not 0.0 <= float(s) <= 1.0:
            raise SurgeryError(f"sensitivity: sparsities must lie in [0, 1], got {s}")
    return _probe(model, evaluate, select, exclude, "sparsity", [float(s) for s in sparsities],
                  lambda w, s: torch.where(magnitude_mask(w, s), w, w.new_zeros(())), progress)


def bits_analysis(model: nn.Module, evaluate: Callable[[nn.Module], dict], bits: Sequence[int] = (8, 6, 4, 2),
                  select: Selector = _DEFAULT_SELECT, exclude: Selector = None, *, init: str = "linear",
                  progress: bool = True) -> AnalysisTable:
    """Share each selected weight tensor alone among 2^b k-means values (non-zeros only) for
    each b in `bits`, call ``evaluate(model)`` and restore it bit-exactly."""
    if init not in INITS:
        raise SurgeryError(f"bits_analysis: unknown init {init!r}; choose one of {', '.join(INITS)}")

    def share(w: torch.Tensor, b: int) -> torch.Tensor:
        return share_tensor(w.cpu(), b, init).to(w.device)

    return _probe(model, evaluate, select, exclude, "bits", [int(b) for b in bits], share, progress)
