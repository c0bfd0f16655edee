#!/usr/bin/env bash
# The figures of Slim beyond one machine, on a private redis-server (loopback port):
#
# 1. Search throughput with 1, 2 and 4 workers of one study: for each count a fresh study of
#    the same small search (ResNet space at width 0.25, each candidate trained 1 epoch on 1,024
#    bundled MNIST images and scored on 512), its workers started together, timed until the
#    study has run its iterations.
# 2. A student's epoch with its teacher in-process, offline (knowledge dumped first) and
#    online (served by 1 and by 2 `slim distill teacher` processes): a ResNet-20 teacher, a
#    LeNet student at width 0.5, the bundled MNIST training split.
#
#   scripts/dist-results.sh
#
# Settings (environment): WORKERS ("1 2 4"), ITERATIONS (per study, 16), THREADS (compute
# threads per search worker, RAYON_NUM_THREADS; 1), EPOCHS (student epochs, 2), PORT (6399),
# OUT (working folder). Needs redis-server and python3 (for the tables).
set -euo pipefail

WORKERS=${WORKERS:-1 2 4}
ITERATIONS=${ITERATIONS:-16}
THREADS=${THREADS:-1}
EPOCHS=${EPOCHS:-2}
PORT=${PORT:-6399}
OUT=${OUT:-dist-results}
SLIM=${SLIM:-target/release/slim}
URL="redis://127.0.0.1:$PORT"

if [ ! -x "$SLIM" ]; then
  cargo build --release -p slim-cli
fi
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 1; }
mkdir -p "$OUT"
pidfile="$(cd "$OUT" && pwd)/redis.pid"
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$pidfile" >/dev/null
servers=()
cleanup() {
  for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
  kill "$(cat "$pidfile")" 2>/dev/null || true
}
trap cleanup EXIT
sleep 0.5
now() { python3 -c "import time; print(time.time())"; }

# 1. Search throughput.
{
  echo "| workers | candidates | seconds | candidates per minute | speed-up |"
  echo "|--------:|-----------:|--------:|----------------------:|---------:|"
} > "$OUT/search.md"
base=""
for n in $WORKERS; do
  study="tp-$n-$$"
  t0=$(now)
  for i in $(seq 1 "$n"); do
    RAYON_NUM_THREADS=$THREADS "$SLIM" nas worker --redis "$URL" --study "$study" \
      --worker-name "w$i" --space resnet --width 0.25 --train-images 1024 --eval-images 512 \
      --epochs 1 --batch-size 64 --seed 1 --iterations "$ITERATIONS" --max-macs 1500000 \
      --out "$OUT/$study-w$i" --json -q > "$OUT/$study-w$i.json" &
  done
  wait
  t1=$(now)
  secs=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  [ -z "$base" ] && base=$secs
  python3 -c "
n, it, s, b = $n, $ITERATIONS, $secs, $base
print(f'| {n} | {it} | {s:.1f} | {it * 60 / s:.1f} | {b / s:.2f}x |')" >> "$OUT/search.md"
done
cat "$OUT/search.md"

# 2. Teachers in-process, offline and online.
[ -f "$OUT/teacher.safetensors" ] || "$SLIM" train --model resnet20 --epochs 1 --limit 2000 -q \
  --out "$OUT/teacher.safetensors" > /dev/null
STUDENT="--student-model lenet --width 0.5 --loss soft_label:temperature=4 --epochs $EPOCHS --json -q"
t0=$(now)
"$SLIM" distill dump --teacher "$OUT/teacher.safetensors" --out "$OUT/knowledge" -q > /dev/null
t1=$(now)
dump=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
"$SLIM" distill --teacher "$OUT/teacher.safetensors" $STUDENT --out "$OUT/inproc.safetensors" > "$OUT/inproc.json"
"$SLIM" distill --teacher "$OUT/knowledge" $STUDENT --out "$OUT/offline.safetensors" > "$OUT/offline.json"
for n in 1 2; do
  for i in $(seq 1 "$n"); do
    "$SLIM" distill teacher --redis "$URL" --name "t$n" --server-name "s$i" \
      --model "$OUT/teacher.safetensors" -q 2> "$OUT/serve-$n-$i.log" &
    servers+=($!)
  done
  "$SLIM" distill --teacher-service "t$n" --redis "$URL" $STUDENT --out "$OUT/online$n.safetensors" \
    > "$OUT/online$n.json"
  for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
  servers=()
done
python3 - "$OUT" "$dump" > "$OUT/teacher.md" <<'PY'
import json, sys
out, dump = sys.argv[1], float(sys.argv[2])
rows = [("in-process", "inproc"), ("offline (knowledge shards)", "offline"),
        ("online, 1 teacher process", "online1"), ("online, 2 teacher processes", "online2")]
base = None
print("| teacher | seconds per epoch | relative | student top-1 |")
print("|---|---:|---:|---:|")
for label, f in rows:
    v = json.load(open(f"{out}/{f}.json"))
    s = v["seconds_per_epoch"]
    base = base or s
    print(f"| {label} | {s:.2f} | {s / base:.2f}x | {v['top1'] * 100:.2f}% |")
print(f"\nThe offline row does not count the dump: {dump:.1f} s, once.")
PY
cat "$OUT/teacher.md"
