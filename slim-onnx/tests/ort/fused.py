"""Prints, as JSON, how many nodes of each op type ONNX Runtime runs for a model after its
graph optimizations (where a QDQ graph's layers become QLinearConv, QGemm, QLinearAdd...).

usage: fused.py MODEL.onnx
"""
import collections
import json
import os
import sys
import tempfile

import onnx
import onnxruntime as ort


def main():
    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        opts.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
        print(json.dumps(collections.Counter(n.op_type for n in graph.node)))


if __name__ == "__main__":
    main()
