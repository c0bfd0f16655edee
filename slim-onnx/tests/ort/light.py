"""Prepares one of the ONNX model zoo's light networks (shipped in the `onnx` package) for a
comparison of Slim's forward with ONNX Runtime's.

usage: light.py NAME OUT_DIR

The light networks fill every weight with one value (ConstantOfShape), so their outputs say
little; this script keeps the graph as it is and gives each weight seeded random values of a
sensible scale (He-scaled filters, batch-norm variances near 1), so that every channel
carries a different signal. The value that feeds the final Softmax (or the last node) is added as a
second graph output. It writes to OUT_DIR:
- `model.onnx`: the light network as shipped (ConstantOfShape weights);
- `random.onnx`: the same graph with random weights and the extra output;
- `input.bin`: one random [1, 3, 224, 224] input (float32, little-endian);
- `output_K.bin`: ONNX Runtime's output K of `random.onnx` on that input;
- `outputs.txt`: one line per output, its name and its dimensions.
"""
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def light_dir():
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def consumers(graph):
    found = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            found.setdefault(name, []).append((node, k))
    return found


def role(graph, uses, name):
    """What a weight feeds: (op type, input index), looking through Unsqueeze."""
    seen = uses.get(name, [])
    while seen and seen[0][0].op_type == "Unsqueeze":
        seen = uses.get(seen[0][0].output[0], [])
    if not seen:
        return ("", 0)
    node, k = seen[0]
    return (node.op_type, k)


def random_weight(rng, shape, what):
    op, k = what
    size = int(np.prod(shape)) if shape else 1
    if op in ("Conv", "Gemm") and k == 1:
        fan_in = size // shape[0] if op == "Conv" else shape[-1]
        return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
    if op == "BatchNormalization":
        if k in (1, 4):  # scale, variance
            return rng.uniform(0.5, 1.5, shape)
        return rng.normal(0.0, 0.1, shape)
    if op == "Mul":
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.0, 0.1, shape)


def main():
    name, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    src = os.path.join(light_dir(), f"light_{name}.onnx")
    shutil.copyfile(src, os.path.join(out, "model.onnx"))
    model = onnx.load(src)
    graph = model.graph
    rng = np.random.default_rng(sum(map(ord, name)))
    uses = consumers(graph)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        shape = [int(d) for d in consts[node.input[0]]]
        values = random_weight(rng, shape, role(graph, uses, node.output[0]))
        graph.initializer.append(
            numpy_helper.from_array(np.asarray(values, dtype=np.float32), node.output[0])
        )
    del graph.node[:]
    graph.node.extend(kept)
    # Old IR versions list every initializer as an input too; the weights now are ones.
    have = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name not in have:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    # A second output: the logits before the final Softmax, else the last node's input.
    last = ([n for n in graph.node if n.op_type == "Softmax"] or list(graph.node))[-1]
    graph.output.append(helper.make_empty_tensor_value_info(last.input[0]))
    path = os.path.join(out, "random.onnx")
    onnx.save(model, path)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = [i for i in session.get_inputs() if i.name not in consts and i.name not in
             {x.name for x in graph.initializer}]
    x = np.random.default_rng(7).normal(0.0, 1.0, (1, 3, 224, 224)).astype(np.float32)
    x.astype("<f4").tofile(os.path.join(out, "input.bin"))
    ys = session.run(None, {feeds[0].name: x})
    with open(os.path.join(out, "outputs.txt"), "w") as f:
        for k, (o, y) in enumerate(zip(session.get_outputs(), ys)):
            np.ascontiguousarray(y, dtype="<f4").tofile(os.path.join(out, f"output_{k}.bin"))
            f.write(o.name + " " + " ".join(str(d) for d in y.shape) + "\n")


if __name__ == "__main__":
    main()
