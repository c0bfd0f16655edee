"""Quantizes a float ONNX model with ONNX Runtime's own static quantizer, as its
documentation says to: `quant_pre_process`, then QDQ with per-channel int8 weights and u8
activations, min-max calibration on the given inputs.

usage: quantize.py MODEL.onnx CALIB.bin N,C,H,W OUT.onnx
"""
import sys

import numpy as np
import onnx
from onnxruntime import quantization as oq
from onnxruntime.quantization.shape_inference import quant_pre_process


class Reader(oq.CalibrationDataReader):
    def __init__(self, name, x, batch=100):
        self.items = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.items, None)


def main():
    model, calib, shape, out = sys.argv[1:5]
    x = np.fromfile(calib, dtype="<f4").reshape([int(d) for d in shape.split(",")])
    pre = out + ".pre.onnx"
    quant_pre_process(model, pre, skip_symbolic_shape=True)
    name = onnx.load(pre).graph.input[0].name
    oq.quantize_static(
        pre,
        out,
        Reader(name, x),
        quant_format=oq.QuantFormat.QDQ,
        per_channel=True,
        activation_type=oq.QuantType.QUInt8,
        weight_type=oq.QuantType.QInt8,
    )


if __name__ == "__main__":
    main()
