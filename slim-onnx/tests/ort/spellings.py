"""Writes small ONNX models that spell common CNN activations and blocks the ways real exporters
write them (PyTorch at several opsets, tf2onnx, Paddle2ONNX), with ONNX Runtime's outputs, so that
a Rust test can import each model into Slim and compare its forward with the reference. Besides
activations and arithmetic: asymmetric padding (Conv pads and auto_pad, Pad in constant, reflect
and edge modes), resampling (Resize at opsets 11 and 13 with scales or sizes, nearest and linear
in four coordinate modes, cubic with and without the taps outside; Upsample at opsets 7 and 9),
ConvTranspose (stride, groups, dilation; per-axis strides and padding, SAME, 1-D), smooth activations (ELU, SELU, Softplus, Softsign, Mish, Min/Max ReLU6), an
L2-normalized embedding, flips (Slice with negative steps), instance and group normalization,
DepthToSpace and SpaceToDepth, convolutions with a stride per axis, a segmenter's ArgMax head, pooling windows (rectangular, dilated, SAME_LOWER, padded
beyond half the window; of sequences and volumes), a tiny segmenter (encoder, skip Concat, decoder, per-pixel logits and their Softmax), and N-d
tensor ops as PyTorch exports them: Split, Concat along a spatial axis, strided Slice, ReduceMean
and ReduceMax (squeeze-and-excite and CBAM gates), Softmax over the last axis (opsets 11 and 13),
Flatten at axis 2, Unsqueeze, MatMul with a constant, binary ops between two data branches that
broadcast, and a small text recognizer (a CNN, then one pre-norm transformer encoder layer with
multi-head attention, a decomposed and a native LayerNormalization and an Erf GELU, then
per-token logits and a pooled classifier).

usage: spellings.py OUT_DIR

Every model is built by hand with onnx.helper, at the lowest IR version its opset allows. Its one
data input is "x", NCHW float32 of a concrete shape with batch 2 ([2, 8, 10, 10] for most cases,
[2, 3, 16, 16] for the stem-like ones, [2, 3, 16, 32] for the recognizer). The pattern under test
sits between layers as in a real network: a Conv (with bias) feeds it and a Conv, GlobalAveragePool
+ Flatten + Gemm, or a MatMul with a constant (PyTorch's nn.Linear on more than 2 dimensions:
MatMul by the [in, out] weight, then Add the bias) reads it. Reshape's shapes copy no batch: they
are constants with -1 in its place, so the models run at any batch.
Weights are seeded random initializers (filters ~ N(0, 1/fan_in), ConvTranspose filters scaled to
the (cin / group) * (k / stride)^2 inputs each output reads, batch-norm variances in [0.5, 1.5]);
each case seeds its own generator from its name, so the files are the same on every run. Scalar
constants are 0-d initializers, or Constant nodes where the case says so (as PyTorch writes them,
the recognizer's among them); Pad's pads, Resize's scales and sizes, Upsample's scales, Reshape's
shape, Split's sizes, Slice's starts, ends, axes and steps and Unsqueeze's axes (from opset 13)
are 1-d initializers; Reduce* axes are attributes (opsets 13 and 17); an absent optional input is
the empty name. Before IR 4 (opset 7) every initializer is also listed
as a graph input, as the exporters of the time wrote it.

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

    def init(self, stem, values, dtype=np.float32):
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def ints(self, stem, values):
        """A 1-d int64 initializer (Pad's pads, Resize's sizes)."""
        return self.init(stem, values, np.int64)

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

    def op_n(self, op_type, inputs, n, **attrs):
        """A node with n outputs (Split); returns their names."""
        stem = op_type.lower()
        outs = [self.fresh(stem) for _ in range(n)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0] + "_node",
                                           **attrs))
        return outs

    def conv(self, x, cin, cout, k=3, stride=1, gain=1.0, bias=0.1, pads=None, auto_pad=None):
        """A Conv with bias; pads k // 2 on every side unless pads (ONNX order: the begins,
        then the ends) or auto_pad (then no pads attribute) says otherwise."""
        fan_in = cin * k * k
        w = self.rng.normal(0.0, gain / np.sqrt(fan_in), (cout, cin, k, k))
        w = self.init("conv_w", w)
        b = self.init("conv_b", self.rng.normal(0.0, bias, cout))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], dilations=[1, 1], group=1)
        if auto_pad is not None:
            attrs["auto_pad"] = auto_pad
        else:
            attrs["pads"] = [k // 2] * 4 if pads is None else list(pads)
        return self.op("Conv", [x, w, b], **attrs)

    def conv_transpose(self, x, cin, cout, k=3, stride=2, pads=1, output_padding=None, group=1,
                       dilation=1, bias=0.1):
        """A ConvTranspose, weight [cin, cout / group, k, k]; bias=None leaves the bias out.
        Each output reads about (cin / group) * (k / stride)^2 weights, hence their scale."""
        reads = (cin // group) * k * k / (stride * stride)
        w = self.init("deconv_w", self.rng.normal(0.0, 1.0 / np.sqrt(reads),
                                                  (cin, cout // group, k, k)))
        inputs = [x, w]
        if bias is not None:
            inputs.append(self.init("deconv_b", self.rng.normal(0.0, bias, cout)))
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pads] * 4,
                     dilations=[dilation, dilation], group=group)
        if output_padding is not None:
            attrs["output_padding"] = list(output_padding)
        return self.op("ConvTranspose", inputs, **attrs)

    def gemm(self, x, fin, fout):
        w = self.init("fc_w", self.rng.normal(0.0, 1.0 / np.sqrt(fin), (fout, fin)))
        b = self.init("fc_b", self.rng.normal(0.0, 0.1, fout))
        return self.op("Gemm", [x, w, b], alpha=1.0, beta=1.0, transB=1)

    def linear(self, x, fin, fout):
        """nn.Linear as PyTorch exports it on [..., fin]: MatMul by the [fin, fout] weight, then
        Add the [fout] bias."""
        w = self.init("linear_w", self.rng.normal(0.0, 1.0 / np.sqrt(fin), (fin, fout)))
        b = self.init("linear_b", self.rng.normal(0.0, 0.1, fout))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def head(self, x, c, classes=5):
        """GlobalAveragePool -> Flatten -> Gemm, as a classifier ends."""
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        return self.gemm(flat, c, classes)

    def output(self, value):
        self.outputs.append(value)

    def model(self):
        opsets = [helper.make_opsetid("", self.opset)]
        ir_version = helper.find_min_ir_version_for(opsets)
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)]
        if ir_version < 4:
            # Before IR 4 every initializer is a graph input too (as old exporters wrote them).
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                       for t in self.inits]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.outputs]
        graph = helper.make_graph(self.nodes, self.name, inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=opsets, producer_name="spellings.py",
                                  ir_version=ir_version)
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
TEXT = [2, 3, 16, 32]


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


def gelu_erf_of(g, y):
    """PyTorch's exact GELU: y * (1 + erf(y / sqrt 2)) * 0.5, its constants Constant nodes."""
    e = g.op("Erf", [g.op("Div", [y, g.scalar(1.4142135, True)])])
    one_plus = g.op("Add", [e, g.scalar(1.0, True)])
    return g.op("Mul", [g.op("Mul", [y, one_plus]), g.scalar(0.5, True)])


def gelu_erf(g):
    y = g.conv("x", C, C)
    g.output(g.conv(gelu_erf_of(g, y), C, C))


def gelu_native(g):
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("Gelu", [y]), C, C))


def gelu_tanh(g):
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("Gelu", [y], approximate="tanh"), C, C))


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


# Padding: asymmetric Conv pads, and Pad nodes in front of a Conv with none.


def conv_same_upper_s2(g):
    y = g.conv("x", C, C)
    # 10 -> 5: one row and column of padding in all, SAME_UPPER puts it after (0 before, 1 after).
    s = g.conv(y, C, C, stride=2, auto_pad="SAME_UPPER")
    g.output(g.conv(s, C, C))


def conv_pads_asymmetric(g):
    y = g.conv("x", C, C)
    a = g.conv(y, C, C, pads=[0, 0, 2, 2])  # all after: 10 -> 10
    b = g.conv(a, C, C, pads=[1, 2, 1, 0])  # rows 1 and 1, columns 2 before, 0 after
    g.output(g.conv(b, C, C))


def pad_input(g, y, pads, mode="constant", value=None):
    """Pad from opset 11 on: pads (and the constant value, if given) are inputs."""
    inputs = [y, g.ints("pads", pads)]
    if value is not None:
        inputs.append(g.scalar(value))
    return g.op("Pad", inputs, mode=mode)


def pad_then_conv(g):
    # tf2onnx's SAME for a stride 2 Conv on an even size: Pad 0 before and 1 after, Conv pads 0.
    y = g.conv("x", C, C)
    p = pad_input(g, y, [0, 0, 0, 0, 0, 0, 1, 1], value=0.0)
    s = g.conv(p, C, C, stride=2, pads=[0, 0, 0, 0])
    g.output(g.conv(s, C, C))


def pad_opset9(g):
    y = g.conv("x", C, C)
    p = g.op("Pad", [y], mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5)
    g.output(g.conv(p, C, C, pads=[0, 0, 0, 0]))


def pad_reflect(g):
    y = g.conv("x", C, C)
    p = pad_input(g, y, [0, 0, 1, 2, 0, 0, 2, 1], mode="reflect")  # 10 -> 13
    g.output(g.conv(p, C, C, pads=[0, 0, 0, 0]))


def pad_edge(g):
    y = g.conv("x", C, C)
    p = pad_input(g, y, [0, 0, 1, 2, 0, 0, 2, 1], mode="edge")
    g.output(g.conv(p, C, C, pads=[0, 0, 0, 0]))


# Resampling: Resize (opset 11 and 13), Upsample (opset 7 and 9), ConvTranspose.


def resize(g, y, scales=None, sizes=None, **attrs):
    """Resize from opset 13 on: no roi (an empty name), then scales or sizes as initializers."""
    if sizes is None:
        inputs = [y, "", g.init("scales", scales)]
    else:
        inputs = [y, "", "", g.ints("sizes", sizes)]
    return g.op("Resize", inputs, **attrs)


def resize_nearest_x2(g):
    y = g.conv("x", C, C)
    r = resize(g, y, scales=[1, 1, 2, 2], mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    g.output(g.conv(r, C, C))


def resize_nearest_sizes(g):
    y = g.conv("x", C, C)
    # half_pixel and round_prefer_floor by default
    r = resize(g, y, sizes=[2, C, 15, 20], mode="nearest")
    g.output(g.conv(r, C, C))


def resize_sizes_from_shape(g):
    """PyTorch's interpolate(size=...) at opset 11: the sizes' batch and channel entries are
    read from the input's shape (Shape -> Gather -> Unsqueeze each), then concatenated with
    the plane's."""
    y = g.conv("x", C, C)
    shape = g.op("Shape", [y])
    dims = [g.op("Unsqueeze", [g.op("Gather", [shape, g.ints("index", i)], axis=0)], axes=[0])
            for i in (0, 1)]
    sizes = g.op("Concat", dims + [g.ints("plane", [11, 23])], axis=0)
    r = g.op("Resize", [y, g.init("roi", []), g.init("scales", []), sizes], mode="linear",
             coordinate_transformation_mode="pytorch_half_pixel")
    g.output(g.conv(r, C, C))


def gather_token(g):
    """A transformer's class token, `tokens[:, 0]` (Gather on data with a scalar index), and
    two picked tokens (a 1-d index list), each into a Gemm."""
    y = g.conv("x", C, C)
    tokens = g.op("Transpose", [g.op("Reshape", [y, g.ints("shape", [0, C, -1])])],
                  perm=[0, 2, 1])
    first = g.op("Gather", [tokens, g.ints("index", 0)], axis=1)
    picked = g.op("Gather", [tokens, g.ints("picks", [3, 1, 2])], axis=1)
    flat = g.op("Flatten", [picked], axis=1)
    w1 = g.init("w", g.rng.normal(0.0, 0.3, (4, C)))
    w2 = g.init("w", g.rng.normal(0.0, 0.3, (4, 3 * C)))
    a = g.op("Gemm", [first, w1], transB=1)
    b = g.op("Gemm", [flat, w2], transB=1)
    g.output(g.op("Add", [a, b]))


def vit_front(g):
    """A vision transformer's front as PyTorch writes it: patches from a strided Conv as
    tokens, a class token expanded over the batch (the batch read from the tokens' shape) and
    concatenated before them, a position embedding added, a layer norm, a product by batched
    constant matrices, and the class token read out into a Gemm."""
    d = 8
    y = g.conv("x", C, d, k=2, stride=2, pads=[0, 0, 0, 0])
    t = g.op("Transpose", [g.op("Reshape", [y, g.ints("shape", [0, d, -1])])], perm=[0, 2, 1])
    batch = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [t]), g.ints("index", 0)], axis=0),
                               g.ints("axes", [0])])
    sizes = g.op("Concat", [batch, g.ints("rest", [1, d])], axis=0)
    cls = g.op("Expand", [g.init("cls", g.rng.normal(0.0, 1.0, (1, 1, d))), sizes])
    tokens = g.op("Concat", [cls, t], axis=1)
    tokens = g.op("Add", [tokens, g.init("pos", g.rng.normal(0.0, 0.5, (1, 26, d)))])
    ln = g.op("LayerNormalization", [tokens, g.init("ln_w", g.rng.normal(1.0, 0.1, d)),
                                     g.init("ln_b", g.rng.normal(0.0, 0.1, d))], axis=-1)
    mixed = g.op("MatMul", [ln, g.init("mix", g.rng.normal(0.0, 0.4, (1, d, d)))])
    first = g.op("Gather", [mixed, g.ints("first", 0)], axis=1)
    w = g.init("w", g.rng.normal(0.0, 0.3, (4, d)))
    g.output(g.op("Gemm", [first, w], transB=1))


def resize_linear_half_pixel(g):
    y = g.conv("x", C, C)
    r = resize(g, y, scales=[1, 1, 2, 2], mode="linear",
               coordinate_transformation_mode="half_pixel")
    g.output(g.conv(r, C, C))


def resize_linear_align_corners(g):
    y = g.conv("x", C, C)
    r = resize(g, y, sizes=[2, C, 19, 19], mode="linear",
               coordinate_transformation_mode="align_corners")
    g.output(g.conv(r, C, C))


def resize_linear_pytorch_half_pixel(g):
    y = g.conv("x", C, C)
    r = resize(g, y, scales=[1, 1, 0.5, 0.5], mode="linear",
               coordinate_transformation_mode="pytorch_half_pixel")
    g.output(g.conv(r, C, C))


def resize_linear_asymmetric(g):
    y = g.conv("x", C, C)
    r = resize(g, y, scales=[1, 1, 1.5, 1.5], mode="linear",
               coordinate_transformation_mode="asymmetric")
    g.output(g.conv(r, C, C))


def resize_cubic(g):
    y = g.conv("x", C, C)
    # cubic_coeff_a -0.75 and half_pixel by default
    r = resize(g, y, scales=[1, 1, 2, 2], mode="cubic")
    g.output(g.conv(r, C, C))


def resize_cubic_exclude_outside(g):
    y = g.conv("x", C, C)
    r = resize(g, y, sizes=[2, C, 7, 13], mode="cubic", cubic_coeff_a=-0.5,
               exclude_outside=1, coordinate_transformation_mode="align_corners")
    g.output(g.conv(r, C, C))


def resize_linear_antialias(g):
    """PyTorch's interpolate(antialias=True) when shrinking (opset 18): every input value
    under the stretched kernel weighs in."""
    y = g.conv("x", C, C)
    r = resize(g, y, scales=[1, 1, 0.4, 0.5], mode="linear", antialias=1)
    g.output(g.conv(r, C, C))


def resize_cubic_antialias(g):
    y = g.conv("x", C, C)
    r = resize(g, y, sizes=[2, C, 5, 7], mode="cubic", antialias=1)
    g.output(g.conv(r, C, C))


def resize_crop_and_resize(g):
    """TensorFlow's crop_and_resize: a region of the plane (part of it outside the input),
    the points outside filled with extrapolation_value."""
    y = g.conv("x", C, C)
    roi = g.init("roi", [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3])
    r = g.op("Resize", [y, roi, "", g.ints("sizes", [2, C, 9, 11])], mode="linear",
             coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=0.5)
    g.output(g.conv(r, C, C))


def conv1d(g):
    """1-D convolutions (an audio or text CNN's), here over a feature map flattened to a
    sequence: strided and padded with a bias, then dilated and grouped."""
    y = g.conv("x", C, C)
    seq = g.op("Reshape", [y, g.ints("shape", [0, C, -1])])
    w1 = g.init("w", g.rng.normal(0.0, 0.3, (6, C, 3)))
    b1 = g.init("b", g.rng.normal(0.0, 0.1, 6))
    h = g.op("Relu", [g.op("Conv", [seq, w1, b1], kernel_shape=[3], pads=[1, 1], strides=[2])])
    w2 = g.init("w", g.rng.normal(0.0, 0.3, (6, 3, 3)))
    h2 = g.op("Conv", [h, w2], kernel_shape=[3], dilations=[2], group=2, pads=[2, 2])
    g.output(h2)
    g.output(g.op("GlobalAveragePool", [h2]))


def pool_windows(g):
    """Pools a text recognizer (CRNN) and Keras write: a 2x2 window at strides (2, 1) with the
    width padded, a dilated 2x3 window padded on every side, a window padded SAME_LOWER, and
    an average over pads beyond half the window in ceil mode, counting the padding."""
    y = g.conv("x", C, C)
    p1 = g.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 1], pads=[0, 1, 0, 1])
    p2 = g.op("MaxPool", [p1], kernel_shape=[2, 3], dilations=[2, 1], pads=[1, 1, 1, 1])
    # (ONNX Runtime 1.32 sizes SAME padding of a dilated pool as if undilated: no dilation here.)
    p3 = g.op("MaxPool", [p2], kernel_shape=[3, 2], auto_pad="SAME_LOWER")
    p4 = g.op("AveragePool", [p3], kernel_shape=[3, 3], strides=[2, 2], pads=[2, 0, 1, 2],
              count_include_pad=1, ceil_mode=1)
    g.output(g.conv(p4, C, C))


def pool_1d_3d(g):
    """Pools of sequences and volumes: a feature map flattened to a sequence, max- and
    average-pooled; and seen as a volume [2, 4, 10, 10] of each group of channels,
    average-pooled over depth, height and width (padding left out of the count), then
    max-pooled in ceil mode."""
    y = g.conv("x", C, C)
    seq = g.op("Reshape", [y, g.ints("shape", [0, C, -1])])
    s1 = g.op("MaxPool", [seq], kernel_shape=[3], strides=[2], pads=[1, 1])
    s2 = g.op("AveragePool", [s1], kernel_shape=[4], strides=[3], ceil_mode=1)
    g.output(s2)
    vol = g.op("Reshape", [y, g.ints("shape", [-1, 2, 4, 10, 10])])
    v1 = g.op("AveragePool", [vol], kernel_shape=[2, 3, 3], strides=[2, 2, 2],
              pads=[0, 1, 1, 1, 1, 1])
    v2 = g.op("MaxPool", [v1], kernel_shape=[2, 2, 3], strides=[1, 2, 2], ceil_mode=1)
    g.output(v2)


def smooth_activations(g):
    """Activations beyond ReLU as other exporters write them: ELU and SELU, Softplus and
    Softsign, and ReLU6 as TensorFlow's converters spell it, Min(Max(x, 0), 6)."""
    y = g.op("Elu", [g.conv("x", C, C)], alpha=0.7)
    y = g.op("Selu", [g.conv(y, C, C)])
    y = g.op("Softsign", [g.op("Softplus", [g.conv(y, C, C)])])
    y = g.conv(y, C, C, gain=4.0)
    y = g.op("Min", [g.op("Max", [y, g.scalar(0.0)]), g.scalar(6.0)])
    g.output(g.conv(y, C, C))


def mish_l2_norm(g):
    """Mish (YOLOv4's activation, native at opset 18), its pieces in a branch beside it, and
    an embedding normalized to unit length (face recognizers): GlobalMaxPool, then the
    vector divided by its ReduceL2; Max and Min of two data branches."""
    y = g.conv("x", C, C)
    m = g.op("Mish", [y])
    pieces = g.op("Mul", [y, g.op("Tanh", [g.op("Softplus", [y])])])
    both = g.op("Max", [g.conv(m, C, C), g.conv(pieces, C, C), g.op("Abs", [y])])
    g.output(g.op("Min", [both, g.op("Exp", [g.op("Neg", [y])])]))
    pooled = g.op("Flatten", [g.op("GlobalMaxPool", [g.conv(m, C, C)])])
    norm = g.op("ReduceL2", [pooled, g.ints("axes", [1])], keepdims=1)
    g.output(g.op("Div", [pooled, norm]))


def flips_and_norms(g):
    """What image models carry inside the graph: the channels reversed (RGB to BGR) and the
    width mirrored by Slices with negative steps, every other row backwards; instance and
    group normalization (style transfer, GANs, detectors); a pixel shuffle upsampling
    (DepthToSpace, both modes) and its inverse (SpaceToDepth)."""
    y = g.conv("x", C, C)
    rev = g.op("Slice", [y, g.ints("starts", [-1, -1]), g.ints("ends", [-(2 ** 63), -(2 ** 63)]),
                         g.ints("axes", [1, 3]), g.ints("steps", [-1, -1])])
    odd = g.op("Slice", [rev, g.ints("starts", [8]), g.ints("ends", [0]), g.ints("axes", [2]),
                         g.ints("steps", [-2])])
    inorm = g.op("InstanceNormalization", [g.conv(odd, C, C), g.init("in_scale", g.rng.uniform(0.5, 1.5, C)),
                                           g.init("in_bias", g.rng.normal(0.0, 0.1, C))], epsilon=1e-4)
    gnorm = g.op("GroupNormalization", [g.conv(y, C, C), g.init("gn_scale", g.rng.uniform(0.5, 1.5, C)),
                                        g.init("gn_bias", g.rng.normal(0.0, 0.1, C))], num_groups=2)
    # (ONNX's shape inference does not see through GroupNormalization: a Reshape restates it.)
    gnorm = g.op("Reshape", [gnorm, g.ints("shape", [-1, C, 10, 10])])
    g.output(g.conv(inorm, C, C))
    up = g.op("DepthToSpace", [gnorm], blocksize=2)
    up2 = g.op("DepthToSpace", [g.conv(y, C, C)], blocksize=2, mode="CRD")
    both = g.op("Add", [up, up2])
    g.output(g.conv(g.op("SpaceToDepth", [both], blocksize=2), C, C))


def conv_strides_per_axis(g):
    """Convolutions with a stride per axis, as a text recognizer's backbone (PaddleOCR's)
    halves the height and keeps the width: (2, 1) padded, (1, 3) SAME_UPPER, and (2, 3),
    where neither stride divides the other."""
    y = g.conv("x", C, C)
    a = g.op("Relu", [g.op("Conv", [y, g.init("w", g.rng.normal(0.0, 0.2, (C, C, 3, 3))),
                                    g.init("b", g.rng.normal(0.0, 0.1, C))],
                           kernel_shape=[3, 3], strides=[2, 1], pads=[1, 1, 1, 1])])
    b = g.op("Conv", [a, g.init("w", g.rng.normal(0.0, 0.2, (C, C, 3, 3)))],
             kernel_shape=[3, 3], strides=[1, 3], auto_pad="SAME_UPPER")
    g.output(g.conv(b, C, C))
    c = g.op("Conv", [y, g.init("w", g.rng.normal(0.0, 0.2, (6, C, 2, 3)))],
             kernel_shape=[2, 3], strides=[2, 3], pads=[0, 1, 1, 0])
    g.output(c)


def argmax_head(g):
    """A segmenter's exported head: per-pixel logits upsampled, then the class of each pixel
    (ArgMax over the channels, cast to float) and the row where each column's score peaks
    (ArgMin of its negation, the last one on ties)."""
    logits = g.conv(g.op("Relu", [g.conv("x", C, C)]), C, 4, k=1)
    up = resize(g, logits, scales=[1, 1, 2, 2], mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    g.output(up)
    cls = g.op("ArgMax", [up], axis=1, keepdims=0)
    g.output(g.op("Cast", [cls], to=TensorProto.FLOAT))
    row = g.op("ArgMin", [g.op("Neg", [up])], axis=2, keepdims=1, select_last_index=1)
    g.output(g.op("Cast", [row], to=TensorProto.FLOAT))


def resize_opset11(g):
    # Opset 11 has no optional inputs here: roi is an empty Constant, as PyTorch writes it.
    y = g.conv("x", C, C)
    roi = g.fresh("const")
    g.nodes.append(helper.make_node("Constant", [], [roi], name=roi,
                                    value=numpy_helper.from_array(
                                        np.zeros(0, dtype=np.float32), roi + "_value")))
    r = g.op("Resize", [y, roi, g.init("scales", [1, 1, 2, 2])], mode="linear",
             coordinate_transformation_mode="half_pixel")
    g.output(g.conv(r, C, C))


def upsample_opset9(g):
    y = g.conv("x", C, C)
    u = g.op("Upsample", [y, g.init("scales", [1, 1, 2, 2])], mode="nearest")
    g.output(g.conv(u, C, C))


def upsample_opset7(g):
    y = g.conv("x", C, C)
    u = g.op("Upsample", [y], mode="linear", scales=[1.0, 1.0, 2.0, 2.0])
    g.output(g.conv(u, C, C))


def convtranspose_s2(g):
    y = g.conv("x", C, C, stride=2)  # 10 -> 5
    # 5 -> (5 - 1) * 2 + 3 - 2 + 1 = 10; 8 -> 6 channels so a swapped weight layout shows.
    d = g.conv_transpose(y, C, 6, k=3, stride=2, pads=1, output_padding=[1, 1])
    g.output(g.conv(d, 6, C))


def convtranspose_groups(g):
    y = g.conv("x", C, C, stride=2)
    d = g.conv_transpose(y, C, 12, k=4, stride=2, pads=1, group=2, bias=None)  # 5 -> 10
    g.output(g.conv(d, 12, C))


def convtranspose_dilation(g):
    y = g.conv("x", C, C)
    d = g.conv_transpose(y, C, 4, k=3, stride=1, pads=1, dilation=2)  # 10 -> 9 + 5 - 2 = 12
    g.output(g.conv(d, 4, C))


def convtranspose_axes(g):
    """Transposed convolutions with a stride and padding per axis: a 3x2 kernel upsampling the
    height only, padded on two sides, with output padding; a SAME_UPPER one (output size
    input x stride); and a 1-D one over a sequence, as a vocoder's upsampling writes it."""
    y = g.conv("x", C, C)
    w = g.init("deconv_w", g.rng.normal(0.0, 0.3, (C, 6, 3, 2)))
    b = g.init("deconv_b", g.rng.normal(0.0, 0.1, 6))
    t = g.op("ConvTranspose", [y, w, b], kernel_shape=[3, 2], strides=[2, 1],
             pads=[1, 0, 0, 1], output_padding=[1, 0])  # 10x10 -> 20x10
    g.output(g.conv(t, 6, C))
    w = g.init("deconv_w", g.rng.normal(0.0, 0.3, (C, 4, 3, 3)))
    g.output(g.op("ConvTranspose", [y, w], kernel_shape=[3, 3], strides=[2, 2],
                  auto_pad="SAME_UPPER"))  # 10x10 -> 20x20
    seq = g.op("Reshape", [y, g.ints("shape", [0, C, -1])])
    w = g.init("deconv_w", g.rng.normal(0.0, 0.3, (C, 4, 4)))
    g.output(g.op("ConvTranspose", [seq, w], kernel_shape=[4], strides=[2], pads=[1, 1]))


def segmenter(g):
    """A tiny encoder-decoder with per-pixel logits and their softmax over the classes."""
    skip = g.op("Relu", [g.conv("x", 3, C, stride=2)])  # 16 -> 8
    deep = g.op("Relu", [g.conv(skip, C, 2 * C, stride=2)])  # 8 -> 4
    up = resize(g, deep, scales=[1, 1, 2, 2], mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    cat = g.op("Concat", [up, skip], axis=1)
    d = g.op("Relu", [g.conv_transpose(cat, 3 * C, C, k=3, stride=2, pads=1,
                                       output_padding=[1, 1])])  # 8 -> 16
    logits = g.conv(d, C, 3, k=1)
    g.output(logits)
    g.output(g.op("Softmax", [logits], axis=1))


# N-d tensor ops as PyTorch exports them, and a transformer block.


def slice_split_concat(g):
    y = g.conv("x", C, C)
    # torch.split(y, [2, 3, 3], 1)
    parts = g.op_n("Split", [y, g.ints("split", [2, 3, 3])], 3, axis=1)
    cat = g.op("Concat", [g.op("Relu", [parts[0]]), g.op("Sigmoid", [parts[1]]), parts[2]],
               axis=1)
    # y[..., 1:9:2]: columns 1, 3, 5, 7
    sliced = g.op("Slice", [cat, g.ints("starts", [1]), g.ints("ends", [9]), g.ints("axes", [3]),
                            g.ints("steps", [2])])
    g.output(g.conv(sliced, C, C))


def concat_axis2(g):
    a = g.conv("x", C, C)  # 10 rows
    b = g.conv("x", C, C, pads=[0, 1, 0, 1])  # 8 rows, 10 columns
    g.output(g.conv(g.op("Concat", [a, b], axis=2), C, C))  # 18 rows


def reduce_ops(g):
    y = g.op("Relu", [g.conv("x", C, C)])
    # Squeeze and excite with the squeeze spelled y.mean((2, 3), keepdim=True).
    squeezed = g.op("ReduceMean", [y], axes=[2, 3], keepdims=1)
    gate = g.op("Sigmoid", [g.conv(squeezed, C, C, k=1, gain=3.0, bias=1.0)])
    excited = g.op("Mul", [y, gate])
    # CBAM's spatial attention from the channel maximum, y.max(1, keepdim=True)[0].
    spatial = g.op("ReduceMax", [excited], axes=[1], keepdims=1)
    attended = g.op("Mul", [excited, g.op("Sigmoid", [spatial])])
    g.output(g.conv(attended, C, C))


def softmax_last_axis(g):
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("Softmax", [y], axis=-1), C, C))


def softmax_legacy_last(g):
    # Before opset 13 Softmax flattens at axis into 2-d; at the last axis that is its softmax.
    y = g.conv("x", C, C)
    g.output(g.conv(g.op("Softmax", [y], axis=3), C, C))


def flatten_axis2(g):
    y = g.conv("x", C, C, stride=2, pads=[0, 0, 0, 0])  # 10 -> 4
    # PyTorch's y.flatten(2): a Reshape that keeps the batch and channel axes.
    flat = g.op("Reshape", [y, g.ints("flat_shape", [-1, C, 16])])  # [2, 8, 16]
    w = g.init("matmul_w", g.rng.normal(0.0, 0.25, (16, 6)))
    g.output(g.op("MatMul", [flat, w]))  # [2, 8, 6]


def unsqueeze_squeeze(g):
    y = g.conv("x", C, C)
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)  # [2, 8]
    column = g.op("Unsqueeze", [flat, g.ints("axes", [2])])  # [2, 8, 1]
    w = g.init("matmul_w", g.rng.normal(0.0, 1.0, (1, 4)))
    g.output(g.op("MatMul", [column, w]))  # [2, 8, 4]


def broadcast_binary(g):
    y = g.conv("x", C, C)  # [2, 8, 10, 10]
    mean = g.op("ReduceMean", [y], axes=[1], keepdims=1)  # [2, 1, 10, 10]
    centered = g.op("Sub", [mean, y])  # the broadcast operand first
    spread = g.op("ReduceMean", [g.op("Mul", [centered, centered])], axes=[1], keepdims=1)
    normed = g.op("Div", [centered, g.op("Add", [spread, g.scalar(1.0)])])  # ... and second
    g.output(g.conv(g.op("Mul", [mean, normed]), C, C))


def layer_norm_decomposed(g, x, d):
    """LayerNorm over the last axis as PyTorch exports it before LayerNormalization: (x - mean)
    / sqrt(mean((x - mean)^2) + eps) * gamma + beta, its scalars Constant nodes."""
    centered = g.op("Sub", [x, g.op("ReduceMean", [x], axes=[-1], keepdims=1)])
    squared = g.op("Pow", [centered, g.scalar(2.0, True)])
    variance = g.op("ReduceMean", [squared], axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [variance, g.scalar(1e-5, True)])])
    normed = g.op("Div", [centered, std])
    gamma = g.init("ln_gamma", g.rng.uniform(0.5, 1.5, d))
    beta = g.init("ln_beta", g.rng.normal(0.0, 0.1, d))
    return g.op("Add", [g.op("Mul", [normed, gamma]), beta])


def recognizer(g):
    """A CNN + attention text recognizer: two stride 2 Convs to a [2, 32, 4, 8] map, its 32
    positions as tokens of 32 channels, one pre-norm encoder layer (4 heads of 8), then per-token
    logits (a CTC head, [2, 32, 10]) and the token mean's classes ([2, 5])."""
    t, d, heads = 32, 32, 4
    dh = d // heads
    f = g.op("Relu", [g.conv("x", 3, 16, stride=2)])  # [2, 16, 8, 16]
    f = g.op("Relu", [g.conv(f, 16, d, stride=2)])  # [2, 32, 4, 8]
    flat = g.op("Reshape", [f, g.ints("shape", [-1, d, t])])  # [2, 32 channels, 32 positions]
    tokens = g.op("Transpose", [flat], perm=[0, 2, 1])  # [2, 32, 32]

    n1 = layer_norm_decomposed(g, tokens, d)
    q, k, v = [g.op("Reshape", [g.linear(n1, d, d), g.ints("shape", [-1, t, heads, dh])])
               for _ in range(3)]  # [2, 32, 4, 8] each
    q = g.op("Transpose", [q], perm=[0, 2, 1, 3])  # [2, 4, 32, 8]
    kt = g.op("Transpose", [k], perm=[0, 2, 3, 1])  # [2, 4, 8, 32]
    v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
    scores = g.op("Div", [g.op("MatMul", [q, kt]), g.scalar(np.sqrt(dh), True)])
    weights = g.op("Softmax", [scores], axis=-1)  # [2, 4, 32, 32]
    mixed = g.op("Transpose", [g.op("MatMul", [weights, v])], perm=[0, 2, 1, 3])  # [2, 32, 4, 8]
    mixed = g.op("Reshape", [mixed, g.ints("shape", [-1, t, d])])
    h = g.op("Add", [g.linear(mixed, d, d), tokens])

    scale = g.init("ln_gamma", g.rng.uniform(0.5, 1.5, d))
    bias = g.init("ln_beta", g.rng.normal(0.0, 0.1, d))
    n2 = g.op("LayerNormalization", [h, scale, bias], axis=-1, epsilon=1e-5)
    mlp = g.linear(gelu_erf_of(g, g.linear(n2, d, 2 * d)), 2 * d, d)
    h = g.op("Add", [mlp, h])

    g.output(g.linear(h, d, 10))  # per-token logits
    pooled = g.op("ReduceMean", [h], axes=[1], keepdims=0)  # [2, 32]
    g.output(g.gemm(pooled, d, 5))


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
    "gelu_tanh": (gelu_tanh, SMALL, 20),
    "leaky_relu": (leaky_relu, SMALL, 13),
    "prelu": (prelu, SMALL, 13),
    "tanh": (tanh, SMALL, 13),
    "scalar_arith": (scalar_arith, SMALL, 13),
    "channel_affine_shared": (channel_affine_shared, SMALL, 13),
    "sub_from_const": (sub_from_const, SMALL, 13),
    "multi_output": (multi_output, STEM, 13),
    "bn_after_gap": (bn_after_gap, STEM, 13),
    "conv_same_upper_s2": (conv_same_upper_s2, SMALL, 13),
    "conv_pads_asymmetric": (conv_pads_asymmetric, SMALL, 13),
    "pad_then_conv": (pad_then_conv, SMALL, 13),
    "pad_opset9": (pad_opset9, SMALL, 9),
    "pad_reflect": (pad_reflect, SMALL, 13),
    "pad_edge": (pad_edge, SMALL, 13),
    "resize_nearest_x2": (resize_nearest_x2, SMALL, 13),
    "resize_nearest_sizes": (resize_nearest_sizes, SMALL, 13),
    "resize_sizes_from_shape": (resize_sizes_from_shape, SMALL, 11),
    "gather_token": (gather_token, SMALL, 13),
    "vit_front": (vit_front, SMALL, 17),
    "resize_linear_half_pixel": (resize_linear_half_pixel, SMALL, 13),
    "resize_linear_align_corners": (resize_linear_align_corners, SMALL, 13),
    "resize_linear_pytorch_half_pixel": (resize_linear_pytorch_half_pixel, SMALL, 13),
    "resize_linear_asymmetric": (resize_linear_asymmetric, SMALL, 13),
    "resize_cubic": (resize_cubic, SMALL, 13),
    "resize_cubic_exclude_outside": (resize_cubic_exclude_outside, SMALL, 13),
    "resize_linear_antialias": (resize_linear_antialias, SMALL, 18),
    "resize_cubic_antialias": (resize_cubic_antialias, SMALL, 18),
    "resize_crop_and_resize": (resize_crop_and_resize, SMALL, 13),
    "resize_opset11": (resize_opset11, SMALL, 11),
    "conv1d": (conv1d, SMALL, 13),
    "smooth_activations": (smooth_activations, SMALL, 13),
    "mish_l2_norm": (mish_l2_norm, SMALL, 18),
    "flips_and_norms": (flips_and_norms, SMALL, 21),
    "conv_strides_per_axis": (conv_strides_per_axis, SMALL, 13),
    "argmax_head": (argmax_head, SMALL, 13),
    "pool_windows": (pool_windows, SMALL, 13),
    "pool_1d_3d": (pool_1d_3d, SMALL, 13),
    "upsample_opset9": (upsample_opset9, SMALL, 9),
    "upsample_opset7": (upsample_opset7, SMALL, 7),
    "convtranspose_s2": (convtranspose_s2, SMALL, 13),
    "convtranspose_groups": (convtranspose_groups, SMALL, 13),
    "convtranspose_dilation": (convtranspose_dilation, SMALL, 13),
    "convtranspose_axes": (convtranspose_axes, SMALL, 13),
    "segmenter": (segmenter, STEM, 13),
    "slice_split_concat": (slice_split_concat, SMALL, 13),
    "concat_axis2": (concat_axis2, SMALL, 13),
    "reduce_ops": (reduce_ops, SMALL, 13),
    "softmax_last_axis": (softmax_last_axis, SMALL, 13),
    "softmax_legacy_last": (softmax_legacy_last, SMALL, 11),
    "flatten_axis2": (flatten_axis2, SMALL, 13),
    "unsqueeze_squeeze": (unsqueeze_squeeze, SMALL, 13),
    "broadcast_binary": (broadcast_binary, SMALL, 13),
    "recognizer": (recognizer, TEXT, 17),
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
    print(f"{name:32s} opset {opset:2d} {size:6d} B  out {shapes:20s} {ops}")


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
