#!/usr/bin/env bash
# Quantization on Fashion-MNIST, in the layout of PaddleSlim's quantization tables: ResNet-20 and
# MobileNetV1 trained by `slim train`, then post-training quantized (abs_max activations with
# abs_max or channel_wise_abs_max weights) and quantization-aware trained for one epoch
# (moving_average_abs_max activations with either weight quantizer; SGD, lr 0.001, cosine).
# Every int8 accuracy is measured by the int8 runtime; sizes are the model files.
#
# Usage: scripts/quant-results.sh            (MODELS, WIDTH, EPOCHS, DATA, OUT override)
set -euo pipefail

MODELS=${MODELS:-resnet20 mobilenet_v1}
WIDTH=${WIDTH:-0.5}
EPOCHS=${EPOCHS:-2}
DATA=${DATA:-fashion-mnist:/usr/share/datasets/fashion-mnist}
OUT=${OUT:-quant-results}
SLIM=${SLIM:-target/release/slim}

if [ ! -x "$SLIM" ]; then
  cargo build --release -p slim-cli
fi
mkdir -p "$OUT"

for m in $MODELS; do
  start=$(date +%s)
  base="$OUT/$m.safetensors"
  if [ ! -f "$base" ]; then
    "$SLIM" train --model "$m" --width "$WIDTH" --data "$DATA" --epochs "$EPOCHS" --batch-size 128 \
      --optimizer sgd --lr 0.1 --momentum 0.9 --nesterov --weight-decay 5e-4 --schedule cosine \
      --seed 0 --out "$base" --json -q > "$OUT/$m-train.json"
  fi
  for w in abs_max channel_wise_abs_max; do
    "$SLIM" quant ptq "$base" --data "$DATA" --weights "$w" --activations abs_max \
      --out "$OUT/$m-ptq-$w.safetensors" --json -q > "$OUT/$m-ptq-$w.json"
    "$SLIM" quant qat "$base" --data "$DATA" --weights "$w" --epochs 1 \
      --optimizer sgd --lr 0.001 --schedule cosine \
      --out "$OUT/$m-qat-$w.safetensors" --json -q > "$OUT/$m-qat-$w.json"
  done
  echo "$m: $(( $(date +%s) - start )) s" >&2
done

python3 - "$OUT" $MODELS <<'PY'
import json, sys
out, models = sys.argv[1], sys.argv[2:]
cols = [("ptq", "abs_max"), ("ptq", "channel_wise_abs_max"), ("qat", "abs_max"), ("qat", "channel_wise_abs_max")]
head = ["model", "FP32"] + [
    f"{'PTQ abs_max' if k == 'ptq' else 'QAT moving_average_abs_max'} / {w}" for k, w in cols
]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for m in models:
    rows = {c: json.load(open(f"{out}/{m}-{c[0]}-{c[1]}.json")) for c in cols}
    first = rows[cols[0]]["before"]
    cells = [m, f"{first['top1'] * 100:.2f}% ({first['bytes'] / 1024:.0f} KB)"]
    for c in cols:
        a = rows[c]["after"]
        d = (a["top1"] - first["top1"]) * 100
        cells.append(f"{a['top1'] * 100:.2f}% ({d:+.2f}); {a['bytes'] / 1024:.0f} KB ({a['bytes'] / first['bytes'] * 100:.0f}%)")
    print("| " + " | ".join(cells) + " |")
PY
