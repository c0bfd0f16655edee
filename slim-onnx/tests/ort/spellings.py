"""Writes small ONNX models that spell common CNN activations and blocks the ways real exporters
write them (PyTorch at several opsets, tf2onnx, Paddle2ONNX), with ONNX Runtime's outputs, so that
a Rust test can import each model into Slim and compare its forward with the reference.

usage: spellings.py OUT_DIR

Every model is built by hand with onnx.helper. Its one data input is "x", NCHW float32 of a
concrete shape with batch 2 ([2, 8, 10, 10] for most cases, [2, 3, 16, 16] for the stem-like
ones). The pattern under test sits between layers as in a real network: a Conv (with bias) feeds
it and a Conv, or GlobalAveragePool + Flatten + Gemm, reads it. Weights are seeded random
initializers (filters ~ N(0, 1/fan_in), batch-norm variances in [0.5, 1.5]); each case seeds its
own generator from its name, so the files are the same on every run. Scalar constants are 0-d
initializers, or Constant nodes where the case says so (as older PyTorch exports write them).

It writes, for each case NAME, the folder OUT_DIR/NAME/ (emptied first, so re-running
overwrites):
- `model.onnx`: the model;
- `input.bin`: one random input (float32, little-endian, row-major);
- `input.txt`: one line, the input's dimensions separated by spaces (batch first);
- `output_K.bin`: ONNX Runtime's graph output K on that input (float32, little-endian);
- `outputs.txt`: one line per graph output, in order: its name and its dimensions.
and OUT_DIR/cases.txt, the case names, one per line. ONNX Runtime runs on the CPU, with one
thread and its graph optimizations off, so the reference is the graph as written, node by node.
"""
import os
import shutil
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


class Graph:
    """A graph under construction: nodes, initializers, fresh names, seeded weights."""

    def __init__(self, name, shape, opset):
        self.name = name
        self.shape = list(shape)
        self.opset = opset
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.nodes = []
        self.inits = []
        self.outputs = []
        self.count = {}

    def fresh(self, stem):
        k = self.count.get(stem, 0)
        self.count[stem] = k + 1
        return f"{stem}_{k}"

    def init(self, stem, values):
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def scalar(self, value, constant_node=False):
        """A 0-d float constant: an initializer, or the output of a Constant node."""
        if not constant_node:
            return self.init("c", np.float32(value))
        name = self.fresh("const")
        tensor = numpy_helper.from_array(np.array(value, dtype=np.float32), name + "_value")
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        return name

    def op(self, op_type, inputs, **attrs):
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out + "_node",
                                           **attrs))
        return out

    def conv(self, x, cin, cout, k=3, stride=1, gain=1.0, bias=0.1):
        fan_in = cin * k * k
        w = self.rng.normal(0.0, gain / np.sqrt(fan_in), (cout, cin, k, k))
        w = self.init("conv_w", w)
        b = self.init("conv_b", self.rng.normal(0.0, bias, cout))
        pad = k // 2
        return self.op("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, dilations=[1, 1], group=1)

    def gemm(self, x, fin, fout):
        w = self.init("fc_w", self.rng.normal(0.0, 1.0 / np.sqrt(fin), (fout, fin)))
        b = self.init("fc_b", self.rng.normal(0.0, 0.1, fout))
        return self.op("Gemm", [x, w, b], alpha=1.0, beta=1.0, transB=1)

    def head(self, x, c, classes=5):
        """GlobalAveragePool -> Flatten -> Gemm, as a classifier ends."""
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        return self.gemm(flat, c, classes)

    def output(self, value):
        self.outputs.append(value)

    def model(self):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.outputs]
        graph = helper.make_graph(self.nodes, self.name, [x], outs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="spellings.py",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        # Give the graph outputs their shapes, as exporters do; keep no other value_info.
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in model.graph.output:
            out.CopyFrom(known[out.name])
        onnx.checker.check_model(model, full_check=True)
        return model


# Each case builds its graph on g (input "x") and names its outputs; C = 8 channels unless said.
C = 8
SMALL = [2, C, 10, 10]
STEM = [2, 3, 16, 16]


def clip_inputs(g, y, lo, hi, constant_node=False):
    """Clip from opset 11 on: min and max are (0-d) inputs."""
    return g.op("Clip", [y, g.scalar(lo, constant_node), g.scalar(hi, constant_node)])


def hardswish_native(g):
    y = g.conv("x", 3, C, stride=2)
    h = g.op("HardSwish", [y])
    g.output(g.head(h, C))


def hardswish_clip_div(g):
    y = g.conv("x", C, C)
    shifted = g.op("Add", [y, g.scalar(3.0)])
    clipped = clip_inputs(g, shifted, 0.0, 6.0)
    prod = g.op("Mul", [y, clipped])
    h = g.op("Div", [prod, g.scalar(6.0)])
    g.output(g.conv(h, C, C))


def hardswish_mul_sixth(g):
    y = g.conv("x", C, C)
    shifted = g.op("Add", [y, g.scalar(3.0, True)])
    clipped = clip_inputs(g, shifted, 0.0, 6.0, True)
    prod = g.op("Mul", [clipped, y])
    h = g.op("Mul", [prod, g.scalar(0.16666667, True)])
    g.output(g.conv(h, C, C))


def hardswish_hardsigmoid(g):
    y = g.conv("x", C, C)
    gate = g.op("HardSigmoid", [y], alpha=1.0 / 6.0, beta=0.5)
    h = g.op("Mul", [y, gate])
    g.output(g.head(h, C))


def se_gate(g, y):
    """Squeeze and excite up to the gate's logits: GlobalAveragePool -> Conv -> Relu -> Conv.
    The last Conv is scaled up so that some logits pass the gate's knees and it saturates."""
    pooled = g.op("GlobalAveragePool", [y])
    squeezed = g.op("Relu", [g.conv(pooled, C, C // 2, k=1)])
    return g.conv(squeezed, C // 2, C, k=1, gain=3.0, bias=1.0)


def hardsigmoid_native(g):
    y = g.op("Relu", [g.conv("x", C, C)])
    gate = g.op("HardSigmoid", [se_gate(g, y)], alpha=0.2, beta=0.5)
    scaled = g.op("Mul", [y, gate])  # timm: x * gate
    g.output(g.conv(scaled, C, C))


def hardsigmoid_clip_div(g):
    y = g.op("Relu", [g.conv("x", C, C)])
    shifted = g.op("Add", [se_gate(g, y), g.scalar(3.0)])
    gate = g.op("Div", [clip_inputs(g, shifted, 0.0, 6.0), g.scalar(6.0)])
    scaled = g.op("Mul", [gate, y])  # torchvision: scale * input
    g.output(g.conv(scaled, C, C))


def relu6_clip_opset11(g):
    y = g.conv("x", C, C)
    g.output(g.conv(clip_inputs(g, y, 0.0, 6.0), C, C))


def relu6_clip_opset9(g):
    y = g.conv("x", C, C)
    r = g.op("Clip", [y], min=0.0, max=6.0)
    g.output(g.conv(r, C, C))


def clip_general(g):
    y = g.conv("x", C, C)
    g.output(g.conv(clip_inputs(g, y, -1.0, 2.0), C, C))


def silu(g):
    y = g.conv("x", C, C)
    s = g.op("Mul", [y, g.op("Sigmoid", [y])])
    g.output(g.conv(s, C, C))


def gelu_erf(g):
    y = g.conv("x", C, C)
    e = g.op("Erf", [g.op("Div", [y, g.scalar(1.4142135, True)])])
    one_plus = g.op("Add", [e, g.scalar(1.0, True)])
    h = g.op("Mul", [g.op("Mul", [y, one_plus]), g.scalar(0.5, True)])
    g.output(g.conv(h, C, C))


def gelu_native(g):
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("Gelu", [y]), C, C))


def leaky_relu(g):
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("LeakyRelu", [y], alpha=0.1), C, C))


def prelu(g):
    y = g.conv("x", C, C)
    slope = g.init("prelu_slope", g.rng.uniform(-0.5, 0.5, (C, 1, 1)))
    g.output(g.head(g.op("PRelu", [y, slope]), C))


def tanh(g):
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("Tanh", [y]), C, C))


def scalar_arith(g):
    y = g.conv("x", C, C)
    z = g.op("Mul", [y, g.scalar(0.5)])
    z = g.op("Add", [z, g.scalar(1.0)])
    z = g.op("Sub", [z, g.scalar(0.25)])
    z = g.op("Div", [z, g.scalar(2.0)])
    g.output(g.conv(g.op("Add", [z, y]), C, C))


def channel_affine_shared(g):
    r = g.op("Relu", [g.conv("x", C, C)])
    scale = g.init("scale", g.rng.uniform(0.5, 1.5, (1, C, 1, 1)))
    shift = g.init("shift", g.rng.normal(0.0, 0.5, (1, C, 1, 1)))
    affine = g.op("Add", [g.op("Mul", [r, scale]), shift])
    branch = g.conv(r, C, C)
    g.output(g.head(g.op("Add", [affine, branch]), C))


def sub_from_const(g):
    y = g.conv("x", C, C)
    gate = g.op("Sub", [g.scalar(1.0), g.op("Sigmoid", [y])])
    g.output(g.conv(g.op("Mul", [y, gate]), C, C))


def multi_output(g):
    features = g.op("Relu", [g.conv("x", 3, C, stride=2)])
    g.output(features)
    deeper = g.op("Relu", [g.conv(features, C, C)])
    g.output(g.head(deeper, C))


def bn_after_gap(g):
    y = g.op("Relu", [g.conv("x", 3, C, stride=2)])
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    scale = g.init("bn_scale", g.rng.uniform(0.5, 1.5, C))
    bias = g.init("bn_bias", g.rng.normal(0.0, 0.1, C))
    mean = g.init("bn_mean", g.rng.normal(0.0, 0.1, C))
    var = g.init("bn_var", g.rng.uniform(0.5, 1.5, C))
    normed = g.op("BatchNormalization", [flat, scale, bias, mean, var], epsilon=1e-5)
    g.output(g.gemm(normed, C, 5))


# name -> (builder, input shape, opset)
CASES = {
    "hardswish_native": (hardswish_native, STEM, 14),
    "hardswish_clip_div": (hardswish_clip_div, SMALL, 13),
    "hardswish_mul_sixth": (hardswish_mul_sixth, SMALL, 13),
    "hardswish_hardsigmoid": (hardswish_hardsigmoid, SMALL, 13),
    "hardsigmoid_native": (hardsigmoid_native, SMALL, 13),
    "hardsigmoid_clip_div": (hardsigmoid_clip_div, SMALL, 13),
    "relu6_clip_opset11": (relu6_clip_opset11, SMALL, 11),
    "relu6_clip_opset9": (relu6_clip_opset9, SMALL, 9),
    "clip_general": (clip_general, SMALL, 13),
    "silu": (silu, SMALL, 13),
    "gelu_erf": (gelu_erf, SMALL, 13),
    "gelu_native": (gelu_native, SMALL, 20),
    "leaky_relu": (leaky_relu, SMALL, 13),
    "prelu": (prelu, SMALL, 13),
    "tanh": (tanh, SMALL, 13),
    "scalar_arith": (scalar_arith, SMALL, 13),
    "channel_affine_shared": (channel_affine_shared, SMALL, 13),
    "sub_from_const": (sub_from_const, SMALL, 13),
    "multi_output": (multi_output, STEM, 13),
    "bn_after_gap": (bn_after_gap, STEM, 13),
}


def write_case(name, out_dir):
    build, shape, opset = CASES[name]
    g = Graph(name, shape, opset)
    build(g)
    model = g.model()
    folder = os.path.join(out_dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path)

    # Std 2 so that the conv outputs reach the clip and gate knees (+-3) often.
    x = g.rng.normal(0.0, 2.0, shape).astype(np.float32)
    x.astype("<f4").tofile(os.path.join(folder, "input.bin"))
    with open(os.path.join(folder, "input.txt"), "w") as f:
        f.write(" ".join(str(d) for d in shape) + "\n")

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    ys = session.run(None, {"x": x})
    with open(os.path.join(folder, "outputs.txt"), "w") as f:
        for k, (o, y) in enumerate(zip(session.get_outputs(), ys)):
            assert np.all(np.isfinite(y)), f"{name}: output {o.name} is not finite"
            np.ascontiguousarray(y, dtype="<f4").tofile(os.path.join(folder, f"output_{k}.bin"))
            f.write(o.name + " " + " ".join(str(d) for d in y.shape) + "\n")

    ops = " ".join(n.op_type for n in model.graph.node)
    shapes = ", ".join("x".join(str(d) for d in y.shape) for y in ys)
    size = os.path.getsize(path)
    print(f"{name:24s} opset {opset:2d} {size:6d} B  out {shapes:16s} {ops}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for name in CASES:
        write_case(name, out_dir)
    with open(os.path.join(out_dir, "cases.txt"), "w") as f:
        f.write("".join(name + "\n" for name in CASES))


if __name__ == "__main__":
    main()
