#!/usr/bin/env bash
# The architecture-search result: an SA search in a space under a latency limit that is a
# fraction of the hand-made network's estimated latency, then the hand-made network and the
# best candidate trained with the same final recipe, their top-1 on the test split, and their
# estimated and measured latency.
#
#   scripts/nas-results.sh       # MobileNetV2 space, width 0.5, on Fashion-MNIST, 80% limit
#
# Settings (environment): DATA, SPACE, WIDTH, FRACTION (of the baseline's latency, 0.8),
# SEARCH (options of `slim nas sa`: budget and the per-candidate recipe), FINAL (options of
# `slim train` for both final trainings), SEED (of both final trainings' initial weights and
# batch order), SAMPLES (random candidates timed into the table), OUT (working folder). Needs python3 for the table; every figure comes from --json output.
set -euo pipefail

DATA=${DATA:-fashion-mnist:/usr/share/datasets/fashion-mnist}
SPACE=${SPACE:-mobilenet_v2}
ZOO=${ZOO:-mobilenet_v2}
WIDTH=${WIDTH:-0.5}
FRACTION=${FRACTION:-0.8}
SEARCH=${SEARCH:---iterations 12 --train-images 3000 --eval-images 1000 --epochs 2 --lr 0.003}
FINAL=${FINAL:---epochs 3 --lr 0.003 --schedule cosine}
SAMPLES=${SAMPLES:-40}
SEED=${SEED:-0}
OUT=${OUT:-nas-results}
SLIM=${SLIM:-target/release/slim}

if [ ! -x "$SLIM" ]; then
  cargo build --release -p slim-cli
fi
mkdir -p "$OUT"
input=$(python3 -c "import sys; print('1x28x28' if 'mnist' in sys.argv[1] else '3x32x32')" "$DATA")
t0=$(date +%s)
# 1. A latency table of the space's candidates on this machine (f32, one thread, batch 1).
[ -f "$OUT/table.json" ] || "$SLIM" latency build --out "$OUT/table.json" \
  --space "$SPACE@$input" --space-width "$WIDTH" --space-samples "$SAMPLES" -q
# 2. The baseline's estimate sets the limit.
"$SLIM" nas sa --space "$SPACE" --width "$WIDTH" --data "$DATA" --latency-table "$OUT/table.json" \
  --fallback --max-latency-ms 1e9 --iterations 1 --train-images 64 --eval-images 64 --epochs 1 \
  --out "$OUT/baseline-probe" --json -q > "$OUT/probe.json"
limit=$(python3 -c "import json,sys; v=json.load(open(sys.argv[1])); print(v['baseline']['measure']['latency_ms']*float(sys.argv[2]))" "$OUT/probe.json" "$FRACTION")
t1=$(date +%s)
# 3. The search.
"$SLIM" nas sa --space "$SPACE" --width "$WIDTH" --data "$DATA" --latency-table "$OUT/table.json" \
  --fallback --max-latency-ms "$limit" $SEARCH --out "$OUT/search" --json -q > "$OUT/search.json"
t2=$(date +%s)
"$SLIM" nas export "$OUT/search" --rank 1 --seed "$SEED" --out "$OUT/best-arch.safetensors" -q
# 4. Final training of both with the same recipe and seed.
"$SLIM" train --model "$ZOO" --width "$WIDTH" --data "$DATA" $FINAL --seed "$SEED" \
  --out "$OUT/baseline.safetensors" --json -q > "$OUT/baseline-train.json"
"$SLIM" train --model "$OUT/best-arch.safetensors" --data "$DATA" $FINAL --seed "$SEED" \
  --out "$OUT/best.safetensors" --json -q > "$OUT/best-train.json"
t3=$(date +%s)
# 5. Estimated and measured latency of both.
"$SLIM" latency validate --table "$OUT/table.json" --fallback --model "$OUT/baseline.safetensors" \
  --model "$OUT/best.safetensors" --json -q > "$OUT/latency.json"
echo "table+probe $((t1 - t0)) s, search $((t2 - t1)) s, final training $((t3 - t2)) s" >&2

python3 - "$OUT" "$limit" <<'PY'
import json, sys
out, limit = sys.argv[1], float(sys.argv[2])
search = json.load(open(f"{out}/search.json"))
lat = {m["model"].rsplit("/", 1)[-1]: m for m in json.load(open(f"{out}/latency.json"))["models"]}
ev = sum(1 for c in search["history"] if c["status"] == "evaluated")
rej = len(search["history"]) - ev
print(f"search: {ev} candidates evaluated, {rej} rejected, {search['seconds']:.0f} s; limit {limit:.3f} ms")
print(f"best: {search['best']['arch']}")
print()
print("| model | MACs | params | estimated ms | measured ms | top-1 | top-5 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in ["baseline", "best"]:
    t = json.load(open(f"{out}/{name}-train.json"))
    l = lat[f"{name}.safetensors"]
    label = "hand-made" if name == "baseline" else "searched"
    print(f"| {label} | {t['macs']:,} | {t['params']:,} | {l['estimated_ms']:.3f} | {l['measured_ms']:.3f} | {t['top1']*100:.2f}% | {t['top5']*100:.2f}% |")
PY
