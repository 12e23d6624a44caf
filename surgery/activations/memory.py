"""How much memory autograd keeps for backward, counted exactly.

PyTorch keeps only the innermost pair of saved-tensor hooks, so a counting pair installed around
the whole model never sees what a compressing region packs inside it. Regions therefore follow a
small protocol (:class:`HookedRegion`): they expose a ``hooks_enabled`` flag and install their
hooks through :func:`saved_tensors_hooks` here, which reports every packed object to an active
counter. ``surgery`` knows only this protocol, never a concrete pass.

Example::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> m = activation_memory(net, (torch.randn(4, 8),))
    >>> m.baseline_bytes == m.compressed_bytes   # no hooked regions: nothing changes
    True
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..calling import as_inputs, call, input_values
from ..copying import storage_key
from ..errors import SurgeryError

__all__ = ["HookedRegion", "saved_tensors_hooks", "hooks_disabled", "SavedBytes", "ActivationMemory",
           "activation_memory", "packed_tensors"]


@runtime_checkable
class HookedRegion(Protocol):
    """A module whose forward runs under its own saved-tensor hooks, installed with
    :func:`saved_tensors_hooks`, and skipped while ``hooks_enabled`` is False."""

    hooks_enabled: bool


_COUNTER: contextvars.ContextVar["SavedBytes | None"] = contextvars.ContextVar("surgery_saved_bytes", default=None)


def packed_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor held by a packed object: a tensor, a dataclass, tuple, list or dict of them."""
    if isinstance(obj, Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from packed_tensors(getattr(obj, f.name))
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from packed_tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from packed_tensors(v)


class SavedBytes:
    """Counts the distinct storages autograd keeps for backward. Parameters and buffers of
    `model` and the `inputs` batch are excluded: they live through the step regardless. A
    storage saved twice counts once."""

    def __init__(self, model: nn.Module, inputs: Any = ()):
        fixed = [*model.parameters(), *model.buffers()]
        fixed += [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)]
        self.skip = {storage_key(t) for t in fixed}
        self.seen: set[int] = set()
        self.bytes = 0
        self.tensors = 0

    def add(self, packed: Any) -> None:
        for t in packed_tensors(packed):
            if t.layout != torch.strided or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage_key(t)
            if ptr in self.skip or ptr in self.seen:
                continue
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
            self.tensors += 1

    def wrap(self, pack: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
        def counting_pack(t: Tensor) -> Any:
            packed = pack(t)
            self.add(packed)
            return packed
        return counting_pack

    @contextlib.contextmanager
    def counting(self) -> Iterator["SavedBytes"]:
        """Count everything saved inside the block (outermost hooks: identity pack)."""
        token = _COUNTER.set(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.wrap(lambda t: t), lambda t: t):
                yield self
        finally:
            _COUNTER.reset(token)


def saved_tensors_hooks(pack: Callable[[Tensor], Any], unpack: Callable[[Any], Tensor]):
    """``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``, with `pack` reporting what it
    stores to an active :class:`SavedBytes` counter. Every :class:`HookedRegion` installs its
    hooks through this function."""
    counter = _COUNTER.get()
    if counter is not None:
        pack = counter.wrap(pack)
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@contextlib.contextmanager
def hooks_disabled(model: nn.Module) -> Iterator[list[str]]:
    """Turn off every :class:`HookedRegion` in `model` for the block (yields their names)."""
    regions = {n: m for n, m in model.named_modules() if isinstance(m, HookedRegion)}
    before = {n: m.hooks_enabled for n, m in regions.items()}
    try:
        for m in regions.values():
            m.hooks_enabled = False
        yield list(regions)
    finally:
        for n, m in regions.items():
            m.hooks_enabled = before[n]


@dataclass
class ActivationMemory:
    """Bytes saved for backward without (baseline) and with the model's hooks; on CUDA also
    the peak memory allocated by a training step above what was allocated before it."""

    baseline_bytes: int
    compressed_bytes: int
    baseline_tensors: int
    compressed_tensors: int
    regions: list[str]
    peak_baseline: int | None = None
    peak_compressed: int | None = None

    @property
    def ratio(self) -> float:
        """compressed / baseline bytes (1.0 when nothing is saved)."""
        return self.compressed_bytes / self.baseline_bytes if self.baseline_bytes else 1.0

    @property
    def reduction(self) -> float:
        """Fraction of saved-activation bytes removed by the hooks."""
        return 1.0 - self.ratio


def _default_loss(out: Any) -> Tensor:
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise SurgeryError("activation_memory: the model returned no floating-point tensor; pass loss_fn=")
    return sum(t.float().mean() for t in leaves)


def _step(model: nn.Module, inputs: tuple | dict[str, Any], loss_fn: Callable[[Any], Tensor], counter: SavedBytes,
          device: torch.device) -> int | None:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    with counter.counting():
        loss = loss_fn(call(model, inputs))
    if loss.requires_grad:
        # backward(), not autograd.grad(): reentrant checkpoints only support the former
        loss.backward()
    del loss
    if cuda:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return None


def _restore(buffers: list, holders: list, grads: list) -> None:
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    for t, g in zip(holders, grads):
        t.grad = g


def activation_memory(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], Tensor] | None = None
                      ) -> ActivationMemory:
    """Run one forward+backward of `model` on `inputs` twice, with its :class:`HookedRegion`
    hooks disabled and enabled, and count the bytes saved for backward each time.

    `inputs`: a tensor, a tuple of positional inputs or a dict of keyword inputs. The count is
    exact and deterministic (distinct storages held by autograd; parameters, buffers and
    `inputs` excluded), so it is meaningful on CPU. `loss_fn(output) -> scalar` defaults to the
    mean of every floating-point output. The model's buffers (BatchNorm statistics), its
    ``.grad`` fields and the global RNG state are left as they were.
    """
    inputs = as_inputs(inputs, model)
    values = input_values(inputs)
    loss_fn = loss_fn or _default_loss
    first = next((t for t in (*values, *model.parameters()) if isinstance(t, Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # the step accumulates into .grad: park the caller's gradients and put them back after
    holders = [*model.parameters(), *(t for t in values if isinstance(t, Tensor) and t.requires_grad)]
    grads = [t.grad for t in holders]
    rng_devices = [device] if device.type == "cuda" else []
    results = []
    try:
        for enabled in (False, True):
            counter = SavedBytes(model, inputs)
            for t in holders:
                t.grad = None
            with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
                if enabled:
                    peak = _step(model, inputs, loss_fn, counter, device)
                    names = [n for n, m in model.named_modules() if isinstance(m, HookedRegion) and m.hooks_enabled]
                else:
                    with hooks_disabled(model):
                        peak = _step(model, inputs, loss_fn, counter, device)
            results.append((counter, peak))
            _restore(buffers, holders, grads)
    finally:
        _restore(buffers, holders, grads)
    (base, peak_b), (comp, peak_c) = results
    return ActivationMemory(base.bytes, comp.bytes, base.tensors, comp.tensors, names, peak_b, peak_c)
