#!/usr/bin/env bash
# Search throughput with 1, 2 and 4 workers of one study: a private redis-server on a loopback
# port, then for each worker count a fresh study of the same small search (ResNet space at
# width 0.25, each candidate trained 1 epoch on 1,024 bundled MNIST images and scored on 512),
# its workers started together, and the time until the study has run its iterations.
#
#   scripts/study-throughput.sh
#
# Settings (environment): WORKERS (counts to try, "1 2 4"), ITERATIONS (per study, 16),
# THREADS (compute threads per worker, RAYON_NUM_THREADS; 1), PORT (6399), OUT (working
# folder). Needs redis-server and python3 (for the table).
set -euo pipefail

WORKERS=${WORKERS:-1 2 4}
ITERATIONS=${ITERATIONS:-16}
THREADS=${THREADS:-1}
PORT=${PORT:-6399}
OUT=${OUT:-study-throughput}
SLIM=${SLIM:-target/release/slim}

if [ ! -x "$SLIM" ]; then
  cargo build --release -p slim-cli
fi
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 1; }
mkdir -p "$OUT"
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$PWD/$OUT/redis.pid" >/dev/null
trap 'kill "$(cat "$OUT/redis.pid")" 2>/dev/null || true' EXIT
sleep 0.5

echo "| workers | candidates | seconds | candidates per minute | speed-up |" > "$OUT/table.md"
echo "|--------:|-----------:|--------:|----------------------:|---------:|" >> "$OUT/table.md"
base=""
for n in $WORKERS; do
  study="tp-$n-$$"
  t0=$(date +%s.%N)
  for i in $(seq 1 "$n"); do
    RAYON_NUM_THREADS=$THREADS "$SLIM" nas worker --redis "redis://127.0.0.1:$PORT" --study "$study" \
      --worker-name "w$i" --space resnet --width 0.25 --train-images 1024 --eval-images 512 \
      --epochs 1 --batch-size 64 --seed 1 --iterations "$ITERATIONS" --max-macs 1500000 \
      --out "$OUT/$study-w$i" --json -q > "$OUT/$study-w$i.json" &
  done
  wait
  t1=$(date +%s.%N)
  secs=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
  [ -z "$base" ] && base=$secs
  python3 - "$n" "$ITERATIONS" "$secs" "$base" >> "$OUT/table.md" <<'EOF'
import sys
n, it, s, b = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"| {n} | {it} | {s:.1f} | {it * 60 / s:.1f} | {b / s:.2f}x |")
EOF
done
cat "$OUT/table.md"
