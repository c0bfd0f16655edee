"""Prepares ONNX's per-op node tests of the ops Slim imports, for the conformance test
(`tests/conformance.rs`), which imports each model into Slim, runs it and compares its outputs
with the stored ones.

usage: node_tests.py OUT_DIR OPS [--data DIR]

OPS is a file with one op type per line (the importer's `SUPPORTED_OPS`), or a comma-separated
list. The node tests are read from `onnx/backend/test/data/node/<test>/` (model.onnx and
test_data_set_0/input_K.pb, output_K.pb, TensorProtos) in the installed `onnx` package, or
from `--data DIR` (a folder of such test folders). Recent `onnx` wheels no longer ship that
folder; then the script builds the same cases with the generator the ONNX repository writes
it with (`onnx.backend.test.case.node.collect_testcases`, the models and the numpy reference
outputs, same test names), with numpy's random source seeded so that every run is the same.

A node test is considered when every node of its graph is an op of OPS in the default domain
(`ai.onnx`). Slim models take one data input and hold everything else (weights, axes, shapes,
scales, pads, a second operand) as constants, as real models do; so the first graph input that
no initializer fills is the data input, and every other graph input becomes an initializer
holding its stored test value (removed from `graph.input` from IR version 4 on, still listed
there before, as those versions require; the model is otherwise unchanged and must still pass
`onnx.checker`). A test whose second input is a float tensor of the same shape as the first
(`test_add`, `test_pow`, `test_prelu_example`) so becomes "data op constant", which is
intended: Slim folds or broadcasts such constants. A test is prepared when its data input is
a float32 tensor, every other input is a tensor with a stored value of its declared type, and
every output is a numeric tensor; otherwise it is listed as skipped with the reason.
It writes to OUT_DIR:
- `<test>/model.onnx`: the model, its inputs but the first made initializers;
- `<test>/input.bin`: the stored input (float32, little-endian, row-major);
- `<test>/input.txt`: one line, the input's dimensions separated by spaces (empty for 0-d);
- `<test>/output_K.bin`: the stored output K, as float32 (integer and boolean outputs are
  converted; float16 and float64 too);
- `<test>/outputs.txt`: one line per graph output, in order: its name and its dimensions;
- `cases.txt`: `test<TAB>op` per prepared test;
- `skipped.txt`: `test<TAB>reason` per considered test that was not prepared;
- `ops.txt`: `test<TAB>op` for every considered test (prepared or skipped).
The op of a test is the op type of its model's node, or for a model of several nodes their
distinct op types in graph order joined with `+` (`HardSigmoid+Mul`).
"""
import glob
import os
import re
import shutil
import sys

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def node_data_dir():
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")


def stored_cases(root):
    """(name, model, inputs, outputs) per test folder, the data of test_data_set_0."""
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        path = os.path.join(folder, "model.onnx")
        if not os.path.isfile(path):
            continue
        model = onnx.load(path)
        data = os.path.join(folder, "test_data_set_0")

        def read(kind):
            files = glob.glob(os.path.join(data, f"{kind}_*.pb"))
            files.sort(key=lambda f: int(re.findall(r"_(\d+)\.pb$", f)[0]))
            return [read_pb(f) for f in files]

        yield name, model, (lambda r=read: r("input")), (lambda r=read: r("output"))


def read_pb(path):
    t = TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return t


def generated_cases():
    """The same tests built by ONNX's node test generator."""
    import warnings

    import onnx.backend.test.case.node as node_cases

    np.random.seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases(None)
    seen = set()
    for case in sorted(cases, key=lambda c: c.name):
        if case.name in seen or not case.model or not case.data_sets:
            continue
        seen.add(case.name)
        inputs, outputs = case.data_sets[0]
        yield case.name, case.model, (lambda i=inputs: list(i)), (lambda o=outputs: list(o))


def as_array(value):
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def op_of(graph):
    ops = []
    for n in graph.node:
        if n.op_type not in ops:
            ops.append(n.op_type)
    return "+".join(ops)


def type_name(elem_type):
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def write_f32(path, array):
    np.ascontiguousarray(array, dtype="<f4").tofile(path)


def as_initializers(model, data, values):
    """A copy of `model` whose graph inputs `data[1:]` are initializers holding `values[1:]`
    (their stored test values); or why that cannot be."""
    graph = model.graph
    tensors = []
    for i, v in zip(data[1:], values[1:]):
        if not i.type.HasField("tensor_type"):
            return None, (
                f"the input `{i.name}` is not a tensor ({i.type.WhichOneof('value')}), "
                "so it cannot be an initializer"
            )
        try:
            t = v if isinstance(v, TensorProto) else numpy_helper.from_array(np.asarray(v))
        except Exception as e:  # noqa: BLE001 (an unencodable value is a reason to skip)
            return None, f"the input `{i.name}` cannot be an initializer ({e})"
        t = TensorProto.FromString(t.SerializeToString())
        t.name = i.name
        want = i.type.tensor_type.elem_type
        if t.data_type != want:
            return None, (
                f"the input `{i.name}` is declared {type_name(want)}, "
                f"its stored value is {type_name(t.data_type)}"
            )
        tensors.append(t)
    if not tensors:
        return model, None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.initializer.extend(tensors)
    if m.ir_version >= 4:
        # From IR version 4 on an initializer need not be an input (and one listed as an input
        # would be a default that a caller may override, which is not a constant).
        names = {t.name for t in tensors}
        kept = [i for i in m.graph.input if i.name not in names]
        del m.graph.input[:]
        m.graph.input.extend(kept)
    try:
        onnx.checker.check_model(m)
    except Exception as e:  # noqa: BLE001 (the checker's refusal is a reason to skip)
        try:
            onnx.checker.check_model(model)
        except Exception:  # noqa: BLE001 (the test's own model fails the checker: keep it)
            return m, None
        return None, f"with its inputs as initializers the model fails the checker ({e})"
    return m, None


def prepare(out_dir, name, model, inputs, outputs):
    """Writes one test; returns None, or why it was skipped."""
    graph = model.graph
    filled = {t.name for t in graph.initializer}
    data = [i for i in graph.input if i.name not in filled]
    if not data:
        return "no data input"
    x = data[0]
    if not x.type.HasField("tensor_type"):
        return f"the input `{x.name}` is not a tensor ({x.type.WhichOneof('value')})"
    if x.type.tensor_type.elem_type != TensorProto.FLOAT:
        return f"the input `{x.name}` is {type_name(x.type.tensor_type.elem_type)}, not FLOAT"
    for o in graph.output:
        if not o.type.HasField("tensor_type"):
            return f"the output `{o.name}` is not a tensor ({o.type.WhichOneof('value')})"
    xs = inputs()
    ys = outputs()
    if len(xs) != len(data):
        return f"{len(xs)} stored inputs for {len(data)} graph inputs"
    if len(ys) != len(graph.output):
        return f"{len(ys)} stored outputs for {len(graph.output)} graph outputs"
    xa = as_array(xs[0])
    if xa.dtype != np.float32:
        return f"the stored input is {xa.dtype}, not float32"
    ya = []
    for o, y in zip(graph.output, ys):
        try:
            a = as_array(y)
        except Exception as e:  # noqa: BLE001 (an undecodable output is a reason to skip)
            return f"the output `{o.name}` cannot be read ({e})"
        if a.dtype.kind not in "fiub":
            return f"the output `{o.name}` is {a.dtype}, not numeric"
        ya.append(a)
    model, why = as_initializers(model, data, xs)
    if why is not None:
        return why
    folder = os.path.join(out_dir, name)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    write_f32(os.path.join(folder, "input.bin"), xa)
    with open(os.path.join(folder, "input.txt"), "w") as f:
        f.write(" ".join(str(d) for d in xa.shape) + "\n")
    with open(os.path.join(folder, "outputs.txt"), "w") as f:
        for k, (o, a) in enumerate(zip(graph.output, ya)):
            write_f32(os.path.join(folder, f"output_{k}.bin"), a.astype(np.float32))
            f.write(" ".join([o.name] + [str(d) for d in a.shape]) + "\n")
    return None


def read_ops(arg):
    if os.path.isfile(arg):
        with open(arg) as f:
            return {line.strip() for line in f if line.strip()}
    return {op.strip() for op in arg.split(",") if op.strip()}


def main():
    args = sys.argv[1:]
    data_dir = None
    if "--data" in args:
        k = args.index("--data")
        data_dir = args[k + 1]
        del args[k : k + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    out_dir, ops_arg = args
    supported = read_ops(ops_arg)
    os.makedirs(out_dir, exist_ok=True)
    data_dir = data_dir or node_data_dir()
    if os.path.isdir(data_dir):
        cases, source = stored_cases(data_dir), data_dir
    else:
        cases, source = generated_cases(), "onnx.backend.test.case.node (generated)"
    prepared, skipped, ops = [], [], []
    total = 0
    for name, model, inputs, outputs in cases:
        total += 1
        nodes = model.graph.node
        if not nodes or not all(
            n.domain in ("", "ai.onnx") and n.op_type in supported for n in nodes
        ):
            continue
        op = op_of(model.graph)
        ops.append((name, op))
        try:
            why = prepare(out_dir, name, model, inputs, outputs)
        except Exception as e:  # noqa: BLE001 (one bad test must not stop the others)
            why = f"could not be prepared: {type(e).__name__}: {e}"
        if why is None:
            prepared.append((name, op))
        else:
            skipped.append((name, " ".join(why.split())))
    with open(os.path.join(out_dir, "cases.txt"), "w") as f:
        f.writelines(f"{n}\t{op}\n" for n, op in prepared)
    with open(os.path.join(out_dir, "skipped.txt"), "w") as f:
        f.writelines(f"{n}\t{why}\n" for n, why in skipped)
    with open(os.path.join(out_dir, "ops.txt"), "w") as f:
        f.writelines(f"{n}\t{op}\n" for n, op in ops)
    print(
        f"{source}: {total} node tests, {len(ops)} of supported ops: "
        f"{len(prepared)} prepared, {len(skipped)} skipped"
    )


if __name__ == "__main__":
    main()
