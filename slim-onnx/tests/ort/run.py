"""Runs an ONNX model in ONNX Runtime: the reference the slim-onnx tests compare against.

usage: run.py MODEL.onnx INPUT.bin N,C,H,W OUTPUT.bin [K]

INPUT.bin and OUTPUT.bin hold float32 values, little-endian, row-major. The output file gets
the model's output K (default 0: the first).
"""
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, inp, shape, out = sys.argv[1:5]
    k = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    dims = [int(d) for d in shape.split(",")]
    x = np.fromfile(inp, dtype="<f4").reshape(dims)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    y = session.run(None, {name: x})[k]
    np.ascontiguousarray(y, dtype="<f4").tofile(out)


if __name__ == "__main__":
    main()
