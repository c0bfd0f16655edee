#!/usr/bin/env bash
# The zoo's f32 forward and training step under two builds of `slim`, in one sitting: a
# regression check for changes to the graph IR and the forward (the op families, pooling).
#
# usage: scripts/zoo-speed.sh BASE_SLIM NEW_SLIM
#
# For mobilenet_v1 and resnet20 on the bundled digits (1x28x28): training images per second
# (one epoch of 1,024 images, batch 64) and `slim bench` milliseconds per forward at batch 1
# and 64 on every core. The two binaries take turns, ROUNDS times each (default 3), and each
# figure is the median of its rounds; the last column is NEW / BASE (time: below 1 is faster;
# training rate: above 1 is faster). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=$1
NEW=$2
ROUNDS=${ROUNDS:-3}
MODELS=${MODELS:-mobilenet_v1 resnet20}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

median() { "$PYTHON" -c 'import sys, statistics; print(statistics.median(float(v) for v in sys.argv[1:]))' "$@"; }
field() { "$PYTHON" -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

echo "$(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $ROUNDS rounds, taking turns; $(date -u +%Y-%m-%d)"
echo
echo "| model | measure | base | new | new / base |"
echo "|---|---|---:|---:|---:|"
for m in $MODELS; do
  declare -A train=() fwd1=() fwd64=()
  for r in $(seq "$ROUNDS"); do
    for side in base new; do
      bin=$BASE; [ "$side" = new ] && bin=$NEW
      file="$OUT/$m-$side.safetensors"
      rate=$("$bin" train --model "$m" --epochs 1 --limit 1024 --out "$file" -q --json | field 'd["images_per_sec"]')
      rm -f "$file.ckpt"
      train[$side]+="$rate "
      ms=$("$bin" bench "$file" --batch 1 --batch 64 --json | field '" ".join(str(x["median_ms"]) for x in d["runs"])')
      read -r b1 b64 <<< "$ms"
      fwd1[$side]+="$b1 "
      fwd64[$side]+="$b64 "
    done
  done
  row() {
    local what=$1 base new
    base=$(median $2); new=$(median $3)
    printf '| %s | %s | %.2f | %.2f | %.3f |\n' "$m" "$what" "$base" "$new" "$("$PYTHON" -c "print($new / $base)")"
  }
  row "training, images/s" "${train[base]}" "${train[new]}"
  row "forward, batch 1, ms" "${fwd1[base]}" "${fwd1[new]}"
  row "forward, batch 64, ms" "${fwd64[base]}" "${fwd64[new]}"
  unset train fwd1 fwd64
done
