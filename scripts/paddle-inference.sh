#!/usr/bin/env bash
# Slim's f32 evaluation forward against Paddle Inference's (PaddlePaddle 2.6.2, oneDNN) on
# `mobilenet_tiny` and `lenet` at batch 1 and 64, in one sitting on this machine: each side
# twice, alternating, with the same protocol (scripts/paddle_inference.py), and Slim's int8
# runtime on the same models post-training quantized (`forward_times --int8`). Paddle is
# installed from PyPI into target/paddle-venv the first time (about 200 MB).
#
#   scripts/paddle-inference.sh [THREADS]     # default 2, Slim's rayon threads as well
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
VENV=target/paddle-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import paddle" 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q paddlepaddle==2.6.2 numpy
fi
cargo build --release -q -p slim-benches --example forward_times
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in 1 2; do
    echo "round $round"
    "$VENV/bin/python" scripts/paddle_inference.py "$out" "$THREADS" 2>/dev/null | grep '^paddle'
    RAYON_NUM_THREADS=$THREADS target/release/examples/forward_times mobilenet_tiny lenet
    RAYON_NUM_THREADS=$THREADS target/release/examples/forward_times --int8 mobilenet_tiny lenet
done
