#!/usr/bin/env bash
# Slim's runtime against ONNX Runtime, in one sitting: for each zoo model (trained briefly on
# the bundled digits, 1x28x28), Slim f32 and int8 (`slim bench`), ONNX Runtime on the float
# export, on its own int8 model (`quantize_static`: QDQ, per-channel int8 weights, u8
# activations) and on Slim's QDQ export, at each batch size and thread count; then the ops
# ONNX Runtime's optimized graph runs for Slim's export. The output is the table of
# docs/performance.md. With SLIM_CPU=avx2 (or portable), Slim's columns use those kernels only.
# INPUT=3x224x224 (any 3xHxW) makes the models for that input instead: trained for one step
# on a folder of the digits enlarged and tinted to that size, written by ort_compare.py.
#
# Usage: scripts/ort-compare.sh    (MODELS, BATCHES, THREADS, RUNS, WARMUP, INPUT, OUT, PYTHON
# override)
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-mobilenet_v1 resnet20 mobilenet_v2 resnet18}
BATCHES=${BATCHES:-1 64}
THREADS=${THREADS:-1 2}
RUNS=${RUNS:-20}
WARMUP=${WARMUP:-20}
INPUT=${INPUT:-1x28x28}
OUT=${OUT:-ort-compare-$INPUT}
SLIM=${SLIM:-target/release/slim}
PYTHON=${PYTHON:-target/onnx-venv/bin/python}

if [ ! -x "$PYTHON" ]; then
  python3 -m venv target/onnx-venv
  target/onnx-venv/bin/python -m pip install -q onnxruntime==1.32.0 numpy==2.4.6 onnx==1.23.2
fi
cargo build --release -q -p slim-cli
mkdir -p "$OUT"
TRAIN=(--data builtin:mnist-10k --limit 1024)
if [ "$INPUT" != 1x28x28 ]; then
  [ -d "$OUT/images" ] || "$PYTHON" scripts/ort_compare.py images "$OUT/images" "$INPUT" 8
  TRAIN=(--data "images:$OUT/images" --limit 16 --batch-size 16)
fi
for m in $MODELS; do
  if [ ! -f "$OUT/$m.safetensors" ]; then
    "$SLIM" train --model "$m" --epochs 1 "${TRAIN[@]}" --out "$OUT/$m.safetensors" -q --json > /dev/null
    rm -f "$OUT/$m.safetensors.ckpt"
  fi
  "$SLIM" quant ptq "$OUT/$m.safetensors" --out "$OUT/$m-int8.safetensors" -q --json > /dev/null
  "$SLIM" export "$OUT/$m.safetensors" --out "$OUT/$m.onnx" > /dev/null
  "$SLIM" export "$OUT/$m-int8.safetensors" --out "$OUT/$m-int8.onnx" > /dev/null
done
"$PYTHON" scripts/ort_compare.py "$SLIM" "$OUT" "$MODELS" "$BATCHES" "$THREADS" "$RUNS" "$WARMUP"
