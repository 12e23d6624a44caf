"""The models of the shrink sweep and what it measures on each: how each family's models are
built and fed (torchvision, timm, Hugging Face, video), and their MACs and latency. See
benchmarks/shrink_sweep.py."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

from surgery.calling import call
from surgery.io.macs import EXTRA_FLOPS, no_fast_paths

# a video clip per model: (frames, side); torchvision's MViT and Swin3D are built for 16x224x224
VIDEO_INPUT = {"mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224), "s3d": (16, 224), "swin3d_t": (16, 224),
               "swin3d_s": (16, 224), "swin3d_b": (16, 224)}


def prepare(model, vectors: bool = False):
    """Random (not zero) weights everywhere, random BN statistics: torchvision zero-initialises
    some heads (ViT), which would make every model output the same and any check vacuous.

    With `vectors` (timm and hf), also near-zero norm gains and layer scales (every parameter of
    at most one dimension that is not a bias and whose entries are all below 1e-3, such as timm's
    zero-initialised last BatchNorm of a residual block or its 1e-5 layer-scale gammas) are drawn
    from [0.5, 1.5): a branch scaled by ~0 adds nothing to the output, and the exactness check
    could not see a wrong channel in it."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            for name, p in m.named_parameters(recurse=False):
                if p.dim() >= 2 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif (vectors and p.dim() <= 1 and p.numel() and p.is_floating_point() and "bias" not in name
                      and float(p.abs().max()) < 1e-3):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def macs(model, inputs) -> int:
    """Multiply-accumulates of one forward (FlopCounterMode). Parameters stop requiring grad
    meanwhile: its module tracker hooks every tensor that requires grad and asserts on one made
    under no_grad from a parameter (CaiT's expanded class token)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.no_grad(), no_fast_paths(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS) as fc:
            call(model, inputs)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return fc.get_total_flops() // 2


def latency(model, inputs, reps: int = 5) -> float:
    """Median seconds per forward at batch 1 (after warm-up); `inputs` as for :func:`macs`."""
    import torch
    times = []
    with torch.no_grad():
        for _ in range(2):
            call(model, inputs)
        deadline = time.perf_counter() + 10
        for _ in range(reps):
            t = time.perf_counter()
            call(model, inputs)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and len(times) >= 3:
                break
    return statistics.median(times)


@dataclasses.dataclass
class Subject:
    """One model of a sweep: the model (prepared), its example inputs (a tuple, or a dict of
    keyword inputs), fresh inputs for the exactness check, what the row records about it, and how
    to build the same model again (Torch-Pruning prunes in place: a fresh one every run)."""
    model: Any
    inputs: tuple | dict
    fresh: tuple | dict
    info: dict
    rebuild: Callable[[], Any]


def subject(family: str, name: str, size: int, scale: str = "toy") -> Subject:
    """Build model `name` of `family` (for timm a family name, see benchmarks/_timm_models.py)
    and its inputs. torchvision: 1x3x`size`x`size`; timm: the model's own input size, sides over
    `size` brought down to it where the model runs on that; hf: _hf_models' example inputs, and
    those of seed 1 as the fresh ones, at `scale` (see _hf_models.build_hf). Raises
    _timm_models.NoModelBuilds for a timm family none of whose models builds."""
    import torch
    torch.manual_seed(0)
    if family == "torchvision":
        import torchvision

        def build():
            return prepare(torchvision.models.get_model(name, weights=None))
        model = build()
        x, x2 = torch.randn(1, 3, size, size), torch.randn(1, 3, size, size)
        return Subject(model, (x,), (x2,), {}, build)
    if family == "video":
        import torchvision

        def build():
            return prepare(torchvision.models.get_model(name, weights=None))
        model = build()
        t, side = VIDEO_INPUT.get(name, (8, 112))
        x, x2 = torch.randn(1, 3, t, side, side), torch.randn(1, 3, t, side, side)
        return Subject(model, (x,), (x2,), {"input_size": [3, t, side, side]}, build)
    if family == "timm":
        from _timm_models import build_timm, input_size
        model, arch, failed = build_timm(name)
        model = prepare(model, vectors=True)
        c, h, w = input_size(model, size)
        info: dict = {"arch": arch, "input_size": [c, h, w]}
        if failed:
            info["not_built"] = failed

        def build():
            return prepare(build_timm(name, [arch])[0], vectors=True)
        torch.manual_seed(0)
        x, x2 = torch.randn(1, c, h, w), torch.randn(1, c, h, w)
        return Subject(model, (x,), (x2,), info, build)
    if family == "hf":
        from _hf_models import HF_MODELS, build_hf, example_inputs

        def build():
            return prepare(build_hf(name, scale=scale)[0], vectors=True)
        model = build()
        return Subject(model, example_inputs(name, scale=scale), example_inputs(name, seed=1, scale=scale),
                       {"kind": HF_MODELS[name][0]}, build)
    raise ValueError(f"unknown family {family!r}")


def model_names(family: str, models: str = "") -> list[str]:
    """The names a sweep of `family` runs: --models, or every classification model / timm
    family / Hugging Face architecture."""
    if models:
        return list(dict.fromkeys(n for n in models.split(",") if n))
    if family == "timm":
        from _timm_models import families
        return list(families())
    if family == "hf":
        from _hf_models import HF_MODELS
        return list(HF_MODELS)
    import torchvision
    if family == "video":
        return torchvision.models.list_models(module=torchvision.models.video)
    return torchvision.models.list_models(module=torchvision.models)
