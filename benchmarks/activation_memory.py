"""Saved-activation memory and step time of CompressActivations on ResNet-18, ResNet-50 and
ViT-B/16, against no compression and against torch.utils.checkpoint.

Bytes are counted exactly by surgery.activation_memory (distinct storages held for backward;
parameters, buffers and the input batch excluded), so they are deterministic on any device.
Step time: every configuration is warmed up, then the configurations take turns, one
forward+backward step each per round, so that a slow spell of the machine hits them all alike;
the table gives each one's median step and the median (and range) over the rounds of its step
divided by the uncompressed step of the same round. On CUDA the peak allocated memory of a step
is reported too. Every method compresses the whole model (one region). A profile of one step per
codec (the ops that take the most time) follows the table.

    python benchmarks/activation_memory.py                          # CPU: batch 8, 112 px, 1 thread
    python benchmarks/activation_memory.py --batch 32 --size 224    # the GPU setting (default on CUDA)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_result  # noqa: E402

import surgery  # noqa: E402
from passes import CompressActivations  # noqa: E402

METHODS = [("random", 0.05), ("threshold", 0.05), ("dct", 0.05), ("wavelet", 0.05), ("dct", 0.1),
           ("int8", None), ("int4", None)]
COMBINED = [("int8", None), ("dct", 0.05)]
"""Codecs also run as checkpoint=True, one region per checkpointed stage / block (STAGES)."""
STAGES = {"vit_b_16": "encoder.layers.encoder_layer_*"}  # others: ResNet stages


class Checkpointed(nn.Module):
    """Runs `body` under torch.utils.checkpoint (reentrant: its inputs go through
    save_for_backward, so the byte counter sees everything it keeps)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=True)


def build(name: str, size: int) -> tuple[nn.Module, nn.Module]:
    """The model and a copy with torch.utils.checkpoint around each stage / encoder block."""
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None, image_size=size)
        ckpt = copy.deepcopy(model)
        ckpt.encoder.layers = nn.Sequential(*[Checkpointed(b) for b in ckpt.encoder.layers])
    else:
        model = getattr(torchvision.models, name)(weights=None)
        ckpt = copy.deepcopy(model)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            setattr(ckpt, stage, Checkpointed(getattr(ckpt, stage)))
    return model, ckpt


def one_step(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward+backward step (synchronised on CUDA)."""
    model.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x).float().mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def take_turns(models: list[nn.Module], x: torch.Tensor, reps: int, warmup: int) -> list[list[float]]:
    """Each model's step times: `warmup` untimed steps each, then `reps` rounds of one step each."""
    for m in models:
        for _ in range(warmup):
            one_step(m, x)
    times: list[list[float]] = [[] for _ in models]
    for _ in tqdm(range(reps), desc="rounds", leave=False):
        for m, t in zip(models, times):
            t.append(one_step(m, x))
    return times


def profile_summary(model: nn.Module, x: torch.Tensor, top: int = 6) -> str:
    """The ops of one step that take the most self time: 'op ms (share)', comma-separated."""
    from torch.profiler import ProfilerActivity, profile
    one_step(model, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(model, x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms ({100 * e.self_cpu_time_total / total:.0f}%)"
                     for e in events[:top])


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def run(models: list[str], batch: int, size: int, reps: int, warmup: int, device: torch.device,
        profile: bool = True) -> tuple[str, str]:
    rows, profiles = [], []
    for name in models:
        torch.manual_seed(0)
        model, ckpt = build(name, size)
        model, ckpt = model.to(device).train(), ckpt.to(device).train()
        x = torch.randn(batch, 3, size, size, device=device)
        plain = surgery.capture(model, (x,)).train()
        base = surgery.activation_memory(plain, (x,))
        ck = surgery.activation_memory(ckpt, (x,))
        configs = [("none", None, plain, base.baseline_bytes, base.peak_baseline),
                   ("checkpoint", None, ckpt, ck.baseline_bytes, ck.peak_baseline)]
        for method, keep in tqdm(METHODS, desc=f"{name}: compress", leave=False):
            gm = surgery.compress(plain, [CompressActivations(method, keep=keep or 0.05)], (x,)).train()
            m = surgery.activation_memory(gm, (x,))
            assert m.baseline_bytes == base.baseline_bytes, "the uncompressed count must not depend on the graph"
            configs.append((method, keep, gm, m.compressed_bytes, m.peak_compressed))
        for method, keep in COMBINED:
            # checkpointed stages with packed inputs, then the rest of the model (stem, head) as its own region
            gm = surgery.compress(plain, [CompressActivations(method, keep=keep or 0.05, checkpoint=True,
                                                              select=STAGES.get(name, "layer*")),
                                          CompressActivations(method, keep=keep or 0.05)], (x,)).train()
            m = surgery.activation_memory(gm, (x,))
            configs.append((f"checkpoint + {method}", keep, gm, m.compressed_bytes, m.peak_compressed))
        floor = next(saved for method, _, _, saved, _ in configs if method == "random")
        times = take_turns([c[2] for c in configs], x, reps, warmup)
        for (method, keep, _, saved, peak), t in zip(configs, times):
            ratios = [a / b for a, b in zip(t, times[0])]
            vs_ck = [a / b for a, b in zip(t, times[1])]
            cut = 1 - saved / base.baseline_bytes
            comp = "-" if method.startswith(("none", "checkpoint")) else \
                f"{100 * (base.baseline_bytes - saved) / (base.baseline_bytes - floor):.1f}%"
            rows.append([name, method if keep is None else f"{method} keep={keep}", mib(saved), f"{100 * cut:.1f}%",
                         comp, f"{saved / ck.baseline_bytes:.2f}", f"{statistics.median(t):.3f}",
                         f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                         f"{statistics.median(vs_ck):.2f}",
                         f"{saved / ck.baseline_bytes * statistics.median(vs_ck):.2f}", mib(peak)])
        if profile and device.type == "cpu":
            for method, keep, gm, _, _ in configs:
                if method in ("none", "threshold", "dct", "wavelet", "int8") and keep in (None, 0.05):
                    profiles.append(f"- {name}, {method}: {profile_summary(gm, x)}")
        del model, ckpt, plain, configs
    headers = ["model", "method", "saved MiB", "cut vs none", "cut of compressible", "bytes / checkpoint",
               "step s (median)", "time / none (range)", "time / checkpoint", "bytes x time / checkpoint's",
               "peak MiB (CUDA)"]
    return markdown_table(headers, rows), "\n".join(profiles)


NOTES = """\
- saved MiB: bytes autograd holds for backward (distinct storages; parameters, buffers and the input
  batch excluded), counted exactly by `surgery.activation_memory`.
- cut of compressible: the cut measured against what a float codec may touch at all. Tensors that
  need no gradient (BatchNorm's saved statistics) pass through by design, and integer tensors
  (max-pool's int64 indices) are stored losslessly by every method but `none` (first value of each
  row as int16, then int8 differences: 12.9% of their int64 bytes here; at 224 px the differences
  across a 112-wide pool input leave int8, and int16 values take 25%); the `random` codec stores
  nothing for floats, so its bytes are that floor (ResNet-18: 0.35% of the saved bytes pass
  through and 0.95% are packed indices; ResNet-50: 0.49% and 0.24%).
- checkpoint: `torch.utils.checkpoint` (reentrant) around each ResNet stage / each ViT encoder
  block; its bytes are the stage inputs and what the stem and head save.
- every compression method wraps the whole model in one region (`CompressActivations(method)`),
  but `checkpoint + method`: `CompressActivations(method, checkpoint=True, select=...)` with one
  region per ResNet stage / ViT encoder block, the same segments as `checkpoint`, whose inputs
  the codec packs (checkpointing with compressed boundaries), then `CompressActivations(method)`
  over the rest (stem and head, which checkpoint keeps as they are).
- the byte budget of a sparse codec at keep=0.05 on a float32 tensor: kept values 5% + index 1.35%
  (the cheapest of a bitmask, 1/32 = 3.1%, int32 positions, 5%, and the chunk-local index, a uint8
  position per kept value plus a uint8 count per 255 values, 1.25% + 0.1%) = 6.35%, plus 1/32
  (3.1%) for a ReLU output, whose exact zero pattern is kept so that ReLU's backward stays exact.
  About half of a ResNet's saved floats are ReLU outputs, so ~92% of the compressible bytes is the
  ceiling at keep=0.05. ViT, without ReLU, could reach 93.6%; it gets 93.3% because each encoder
  block's attention output is saved through two views of one storage (by attention as
  (2, 12, 50, 64), by out_proj as (100, 768)), which the baseline counts once and the codec packs
  twice (0.4% of the saved bytes). What a ResNet keeps at keep=0.05 is then, in order: ReLU
  outputs (ResNet-18: 4.0% of the saved bytes, ResNet-50: 4.3%), conv outputs saved by
  BatchNorm (2.9%, 3.3%), the packed max-pool indices (0.95%, 0.24%), the pass-through BatchNorm
  statistics (0.35%, 0.49%) and the max-pool output (0.35%, 0.09%).
- int8/int4: one code per value plus a float32 minimum and step per group of 256 (int8: 25.8% of
  float32 bytes).
- what a codec does per saved tensor (passes/packing.py, passes/transforms.py): threshold, dct and
  wavelet keep the coefficients above a magnitude threshold estimated from a sample of about
  4096/keep values (linear time; the number kept is within 2% of the budget on the tensors of
  tests/test_codecs.py, and never includes a zero), then store them with their chunk-local index
  (on CPU numpy's compare and flatnonzero, one gather, a bincount; back, numpy's zeros and one
  indexed store); dct and wavelet transform by
  matrix products: a plane of at most 256 values by one whole-plane matrix (a one-tile DCT's
  Kronecker matrix; every DWT level at once), a DCT plane no wider than 32 by each side's
  block-diagonal matrix, wider ones by 8 x 8 tile products, the DWT of larger planes by level
  matrices; a ReLU output's support is one bit per value (on CPU numpy's packbits and unpackbits,
  elsewhere an int64 multiply and a table lookup). int8/int4: two reductions, a broadcast multiply, an in-place add and
  round, and a cast to int8 (3x faster than to uint8 on CPU). No Python loop runs over channels,
  planes or tiles.
- dropped positives of a ReLU output come back as 2^-64, not as the smallest normal float: with
  1e-38, every product of such a value with a gradient in conv backward was subnormal, and
  ResNet-50 backward ran 4-8x slower on this CPU (the cause of most of the earlier 11x and 5.6x).
- CPU step times on a 2-core machine: the configurations alternate, so a slow spell of the machine
  hits them all alike; the range column shows how far single rounds strayed. Integer packing costs
  one host sync per integer tensor (its storage dtype depends on its values), and the sparse
  codecs one each (the number of values above the threshold).
"""


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,vit_b_16")
    ap.add_argument("--batch", type=int, default=32 if cuda else 8)
    ap.add_argument("--size", type=int, default=224 if cuda else 112)
    ap.add_argument("--reps", type=int, default=10, help="timed rounds (each configuration one step per round)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-codec profile of one step")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--name", default="activation_memory", help="results file name (benchmarks/results/NAME.md)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    table, profiles = run(args.models.split(","), args.batch, args.size, args.reps, args.warmup, device,
                          not args.no_profile)
    print(table)
    where = "GPU" if device.type == "cuda" else "CPU"
    notes = f"- {where}: batch {args.batch}, {args.size} px, {args.threads} thread(s); {args.warmup} warm-up " \
            f"steps per configuration, then {args.reps} rounds in which every configuration takes one step.\n" + NOTES
    if profiles:
        notes += ("\n## Where a step's time goes (torch.profiler, self CPU time of one step, top ops)\n\nnumpy's "
                  "work in a pack hook (the sample's selection, the compare and compaction) is no aten op: it shows "
                  "as\nself time of the op whose output is packed (native_batch_norm, relu_).\n" + profiles + "\n")
    path = write_result(args.name, f"Activation compression: saved bytes and step time ({where})",
                        None, table, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
