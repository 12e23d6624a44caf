"""ResNet-50 at ChannelPrune(ratio=0.5, round_to=8): CPU latency speedup per MAC reduction.

speedup / MAC reduction is how much of the theoretical gain the shrunk model realises (the
physical limit is 1.0). Dense and shrunk models are timed in alternation, so a change in the
machine's load hits both alike; the figure is the median over rounds.

    OMP_NUM_THREADS=2 python benchmarks/shrink_latency.py [--rounds 15] [--model resnet50] [--threads 2,1]

Five forms are timed, dense and shrunk alike: the captured GraphModule as Shrink returns it;
TorchScript frozen for inference (torch.jit.freeze + optimize_for_inference, which folds
BatchNorm into the convolutions); the file `surgery.export(..., freeze=True)` writes, loaded
with plain torch.jit.load and run with `torch.jit.enable_onednn_fusion(True)` (oneDNN Graph
fuses conv/BN/ReLU/add, which removes most of the fixed per-op cost that small layers pay); the
.pt2 file `surgery.export` writes, loaded with torch.export.load and run as its module (eager
ATen ops); and the .onnx file, run by ONNX Runtime on its CPU execution provider with as many
intra-op threads as torch has (all graph optimisations on, the default).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torchvision  # noqa: E402
from _sweep_models import macs, prepare  # noqa: E402

import surgery  # noqa: E402
from passes import ChannelPrune, Shrink  # noqa: E402


def paired_latency(a, b, x, rounds: int) -> tuple[float, float]:
    ta, tb = [], []
    with torch.no_grad():
        for m in (a, b, a, b):
            m(x)  # warm-up
        for _ in range(rounds):
            for m, acc in ((a, ta), (b, tb)):
                t = time.perf_counter()
                m(x)
                acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", default="", help="comma-separated torch thread counts (default: as set)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = prepare(torchvision.models.get_model(args.model, weights=None))
    x1 = torch.randn(1, 3, 224, 224)
    small = surgery.compress(model, [ChannelPrune(ratio=args.ratio, round_to=args.round_to), Shrink()],
                             example_inputs=(x1,)).eval()
    dense = surgery.capture(model, (x1,)).eval()  # same fx/Interpreter-free GraphModule form as `small`
    m0, m1 = macs(dense, x1), macs(small, x1)
    p0 = sum(p.numel() for p in dense.parameters())
    p1 = sum(p.numel() for p in small.parameters())
    rows = []
    from _report import markdown_table, write_result
    tmp = Path(tempfile.mkdtemp())

    def deployed(m):  # frozen for inference (torch.jit.freeze + optimize_for_inference: BN folded into convs)
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(m.eval())))

    for name, m in (("dense", dense), ("small", small)):  # what a user deploys: verified files
        surgery.export(m, tmp / f"{name}.pt", (x1,), freeze=True)
        surgery.export(m, tmp / f"{name}.pt2", (x1,))
        surgery.export(m, tmp / f"{name}.onnx", (x1,))

    def onnx_runtime(name: str, threads: int):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(tmp / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        return lambda x: session.run(None, {feed: x.numpy()})
    forms = {"GraphModule (eager)": lambda: (dense, small),
             "TorchScript, frozen": lambda: (deployed(dense), deployed(small)),
             # loaded fresh per thread count: the oneDNN Graph partitions are compiled on first runs
             "export(freeze=True), oneDNN fusion": lambda: (surgery.load_torchscript(tmp / "dense.pt"),
                                                            surgery.load_torchscript(tmp / "small.pt")),
             ".pt2 (torch.export.load)": lambda: (torch.export.load(str(tmp / "dense.pt2")).module(),
                                                  torch.export.load(str(tmp / "small.pt2")).module()),
             ".onnx, ONNX Runtime (CPU EP)": lambda: (onnx_runtime("dense", torch.get_num_threads()),
                                                      onnx_runtime("small", torch.get_num_threads()))}
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    for nt in threads:
        torch.set_num_threads(nt)
        for form, build in forms.items():
            a, b_ = build()
            torch.jit.enable_onednn_fusion("oneDNN" in form)
            for b in [int(s) for s in args.batches.split(",")]:
                x = torch.randn(b, 3, 224, 224)
                t0, t1 = paired_latency(a, b_, x, args.rounds if b == 1 else max(5, args.rounds // 3))
                speed = t0 / t1
                rows.append([form, nt, b, f"{t0 * 1e3:.1f}", f"{t1 * 1e3:.1f}", f"{speed:.2f}x", f"{m0 / m1:.2f}x",
                             f"{speed / (m0 / m1):.2f}"])
                print(rows[-1], flush=True)
            torch.jit.enable_onednn_fusion(False)
    tab = markdown_table(["form", "threads", "batch", "dense ms", "shrunk ms", "speedup", "MAC reduction",
                          "speedup / MAC reduction"], rows)
    torch.set_num_threads(threads[0])  # the machine line reports the first thread count
    notes = (f"{args.model}, ChannelPrune(ratio={args.ratio}, round_to={args.round_to}) then Shrink: params "
             f"{p0 / 1e6:.1f} M -> {p1 / 1e6:.1f} M, MACs {m0 / 1e9:.2f} G -> {m1 / 1e9:.2f} G at 224x224. "
             "Latency: median over alternating rounds, torch.no_grad, eval mode.")
    path = write_result("shrink_latency", f"Shrink latency: {args.model} speedup per MAC reduction",
                        "OMP_NUM_THREADS=2 python " + " ".join(["benchmarks/shrink_latency.py", *sys.argv[1:]]),
                        tab, notes)
    print(notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
