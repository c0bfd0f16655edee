"""Times ONNX Runtime on Slim's exports and on its own int8 model, beside Slim's runtime.

Called by scripts/ort-compare.sh with the model files it made; prints a markdown table (one
row per model, batch and thread count: milliseconds per forward, medians) and, for Slim's
QDQ export, the ops ONNX Runtime's optimized graph runs (every convolution should have become
QLinearConv).

Usage: ort_compare.py SLIM_BIN WORKDIR MODELS BATCHES THREADS RUNS [WARMUP]
       ort_compare.py images DIR CxHxW PER_CLASS

The second form writes a folder of colour images (`images:DIR`) for models of a larger input:
the bundled digits, enlarged to HxW and tinted, PER_CLASS of each, as 24-bit BMP files.
"""

import collections
import gzip
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization as oq
from onnxruntime.quantization.shape_inference import quant_pre_process


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def session(path, threads, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized:
        so.optimized_model_filepath = optimized
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def time_ort(path, x, threads, runs, warmup):
    s = session(path, threads)
    name = s.get_inputs()[0].name
    for _ in range(warmup):
        s.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


class Reader(oq.CalibrationDataReader):
    def __init__(self, name, batches):
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_int8(f32_path, out_path, shape, seed=0):
    """ONNX Runtime's own static quantization of the float export, as its documentation
    says to do it: `quant_pre_process` first (batch norms folded, shapes inferred), then
    QDQ with per-channel int8 weights and u8 activations, min-max calibration on 8 batches of
    normal noise."""
    rng = np.random.default_rng(seed)
    name = onnx.load(f32_path).graph.input[0].name
    batches = [rng.standard_normal((8, *shape)).astype(np.float32) for _ in range(8)]
    pre = out_path + ".pre.onnx"
    quant_pre_process(f32_path, pre, skip_symbolic_shape=True)
    oq.quantize_static(
        pre,
        out_path,
        Reader(name, batches),
        quant_format=oq.QuantFormat.QDQ,
        per_channel=True,
        activation_type=oq.QuantType.QUInt8,
        weight_type=oq.QuantType.QInt8,
    )


def write_bmp(path, rgb):
    """An HxWx3 uint8 image as an uncompressed 24-bit BMP (rows bottom-up, BGR, each row
    padded to four bytes)."""
    h, w, _ = rgb.shape
    pad = (4 - (w * 3) % 4) % 4
    rows = np.zeros((h, w * 3 + pad), np.uint8)
    rows[:, : w * 3] = rgb[::-1, :, ::-1].reshape(h, w * 3)
    body = rows.tobytes()
    header = b"BM" + (54 + len(body)).to_bytes(4, "little") + bytes(4) + (54).to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + w.to_bytes(4, "little") + h.to_bytes(4, "little")
    info += (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + bytes(24)
    with open(path, "wb") as f:
        f.write(header + info + body)


def write_images(out, shape, per_class):
    """The bundled training digits, each enlarged (nearest) to the shape's size and tinted
    by its class, so that the folder reads as colour images of that size."""
    c, h, w = (int(v) for v in shape.split("x"))
    if c != 3:
        sys.exit(f"images: {shape}: colour images have 3 channels")
    with gzip.open("data/mnist-10k/train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open("data/mnist-10k/train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    ys = np.arange(h) * 28 // h
    xs = np.arange(w) * 28 // w
    for k in range(10):
        os.makedirs(f"{out}/{k}", exist_ok=True)
        tint = np.array([1.0, 0.4 + 0.06 * k, 1.0 - 0.08 * k])
        for i, j in enumerate(np.flatnonzero(labels == k)[:per_class]):
            grey = images[j][ys][:, xs].astype(np.float64)
            write_bmp(f"{out}/{k}/{i:04d}.bmp", (grey[:, :, None] * tint).astype(np.uint8))


def fused_ops(path, workdir):
    opt = os.path.join(workdir, os.path.basename(path) + ".optimized.onnx")
    session(path, 1, optimized=opt)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    return dict(sorted(ops.items()))


def slim_bench(slim, path, batches, threads, runs, warmup):
    args = [slim, "bench", path, "--json", "--runs", str(runs), "--warmup", str(warmup)]
    for b in batches:
        args += ["--batch", str(b)]
    for t in threads:
        args += ["--threads", str(t)]
    out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    SLIM_LEVEL[0] = out["cpu"]
    return {(r["batch"], r["threads"]): r["median_ms"] for r in out["runs"]}


# The kernel level Slim ran at (SLIM_CPU caps it), as `slim bench` reports it.
SLIM_LEVEL = ["?"]


def main():
    if sys.argv[1] == "images":
        write_images(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    slim, work, models, batches, threads, runs = sys.argv[1:7]
    warmup = int(sys.argv[7]) if len(sys.argv) > 7 else 20
    models = models.split()
    batches = [int(b) for b in batches.split()]
    threads = [int(t) for t in threads.split()]
    runs = int(runs)
    rows = []
    header = ("| model | input | batch | threads | ORT f32 | ORT int8 (its quantizer) "
              "| ORT on Slim's QDQ | Slim f32 | Slim int8 | Slim int8 / ORT int8 "
              "| Slim f32 / Slim int8 |")
    fused = {}
    for m in models:
        f32, q8 = f"{work}/{m}.onnx", f"{work}/{m}-int8.onnx"
        theirs = f"{work}/{m}-ort-int8.onnx"
        shape = [d.dim_value for d in onnx.load(f32).graph.input[0].type.tensor_type.shape.dim[1:]]
        ort_int8(f32, theirs, shape)
        fused[m] = fused_ops(q8, work)
        s32 = slim_bench(slim, f"{work}/{m}.safetensors", batches, threads, runs, warmup)
        s8 = slim_bench(slim, f"{work}/{m}-int8.safetensors", batches, threads, runs, warmup)
        for t in threads:
            for b in batches:
                x = np.random.default_rng(1).standard_normal((b, *shape)).astype(np.float32)
                a = time_ort(f32, x, t, runs, warmup)
                o8 = time_ort(theirs, x, t, runs, warmup)
                q = time_ort(q8, x, t, runs, warmup)
                rows.append(f"| {m} | {'x'.join(map(str, shape))} | {b} | {t} | {a:.2f} "
                            f"| {o8:.2f} | {q:.2f} | {s32[(b, t)]:.2f} | {s8[(b, t)]:.2f} "
                            f"| {s8[(b, t)] / o8:.2f} | {s32[(b, t)] / s8[(b, t)]:.2f} |")
    slim_kernels = os.environ.get("SLIM_CPU") and f"capped by SLIM_CPU={os.environ['SLIM_CPU']}"
    print(f"{cpu_name()}; ONNX Runtime {ort.__version__}; Slim's kernels: {SLIM_LEVEL[0]}"
          f"{' (' + slim_kernels + ')' if slim_kernels else ''}; median of {runs} forwards "
          f"after {warmup} warm-up ones; `scripts/ort-compare.sh`, {time.strftime('%Y-%m-%d')}")
    print()
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(r)
    print()
    print("Ops ONNX Runtime runs for Slim's QDQ export (after its graph optimizations):")
    print()
    for m, ops in fused.items():
        print(f"- {m}: " + ", ".join(f"{k} {v}" for k, v in ops.items()))


if __name__ == "__main__":
    main()
