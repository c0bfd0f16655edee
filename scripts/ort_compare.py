"""Times ONNX Runtime on Slim's exports and on its own int8 model, beside Slim's runtime.

Called by scripts/ort-compare.sh with the model files it made; prints a markdown table (one
row per model, batch and thread count: milliseconds per forward, medians) and, for Slim's
QDQ export, the ops ONNX Runtime's optimized graph runs (every convolution should have become
QLinearConv).

Usage: ort_compare.py SLIM_BIN WORKDIR MODELS BATCHES THREADS RUNS
"""

import collections
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


def time_ort(path, x, threads, runs, warmup=20):
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


def fused_ops(path, workdir):
    opt = os.path.join(workdir, os.path.basename(path) + ".optimized.onnx")
    session(path, 1, optimized=opt)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    return dict(sorted(ops.items()))


def slim_bench(slim, path, batches, threads, runs):
    args = [slim, "bench", path, "--json", "--runs", str(runs), "--warmup", "20"]
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
    slim, work, models, batches, threads, runs = sys.argv[1:7]
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
        s32 = slim_bench(slim, f"{work}/{m}.safetensors", batches, threads, runs)
        s8 = slim_bench(slim, f"{work}/{m}-int8.safetensors", batches, threads, runs)
        for t in threads:
            for b in batches:
                x = np.random.default_rng(1).standard_normal((b, *shape)).astype(np.float32)
                a = time_ort(f32, x, t, runs)
                o8 = time_ort(theirs, x, t, runs)
                q = time_ort(q8, x, t, runs)
                rows.append(f"| {m} | {'x'.join(map(str, shape))} | {b} | {t} | {a:.2f} "
                            f"| {o8:.2f} | {q:.2f} | {s32[(b, t)]:.2f} | {s8[(b, t)]:.2f} "
                            f"| {s8[(b, t)] / o8:.2f} | {s32[(b, t)] / s8[(b, t)]:.2f} |")
    slim_kernels = os.environ.get("SLIM_CPU") and f"capped by SLIM_CPU={os.environ['SLIM_CPU']}"
    print(f"{cpu_name()}; ONNX Runtime {ort.__version__}; Slim's kernels: {SLIM_LEVEL[0]}"
          f"{' (' + slim_kernels + ')' if slim_kernels else ''}; median of {runs} forwards "
          f"after 20 warm-up ones; `scripts/ort-compare.sh`, {time.strftime('%Y-%m-%d')}")
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
