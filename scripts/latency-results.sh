#!/usr/bin/env bash
# The latency-table accuracy figures: builds one table per runtime (f32 on candle, Slim's int8
# runtime) from the zoo models at the sizes below, single thread, batch 1, then validates each
# table on the same models (estimated vs measured whole-model latency) and prints a Markdown
# table of the errors and the mean absolute percentage error.
#
#   scripts/latency-results.sh                 # the figures of docs/results.md
#   RUNTIMES=f32 RUNS=10 scripts/latency-results.sh
#
# Settings (environment): MODELS (zoo NAME@CxHxW entries), RUNTIMES ("f32 int8"), RUNS (timed
# runs per model, 20), OUT (working folder). Needs python3 for the table; every figure comes
# from `slim latency validate --json`.
set -euo pipefail

MODELS=${MODELS:-lenet@1x28x28 resnet20@1x28x28 resnet20@3x32x32 mobilenet_v1@1x28x28 mobilenet_v1@3x32x32 mobilenet_v2@1x28x28 mobilenet_v2@3x32x32 resnet18@3x224x224 mobilenet_v2@3x224x224}
RUNTIMES=${RUNTIMES:-f32 int8}
RUNS=${RUNS:-20}
OUT=${OUT:-latency-results}
SLIM=${SLIM:-target/release/slim}

if [ ! -x "$SLIM" ]; then
  cargo build --release -p slim-cli
fi
mkdir -p "$OUT"
ZOO=()
for m in $MODELS; do ZOO+=(--zoo "$m"); done

for rt in $RUNTIMES; do
  start=$(date +%s)
  rm -f "$OUT/table-$rt.json"
  "$SLIM" latency build --out "$OUT/table-$rt.json" --runtime "$rt" --threads 1 --batch 1 \
    --runs "$RUNS" "${ZOO[@]}" -q
  "$SLIM" latency validate --table "$OUT/table-$rt.json" --runs "$RUNS" "${ZOO[@]}" --json -q \
    > "$OUT/validate-$rt.json"
  echo "$rt: built and validated in $(( $(date +%s) - start )) s" >&2
done

python3 - "$OUT" $RUNTIMES <<'PY'
import json, sys
out, runtimes = sys.argv[1], sys.argv[2:]
rows = {}
mape = {}
for rt in runtimes:
    v = json.load(open(f"{out}/validate-{rt}.json"))
    mape[rt] = v["mape"]
    for m in v["models"]:
        rows.setdefault(m["model"], {})[rt] = m
print("| model | " + " | ".join(f"{rt} estimated ms | {rt} measured ms | {rt} error" for rt in runtimes) + " |")
print("|---|" + "---:|---:|---:|" * len(runtimes))
for name, per in rows.items():
    cells = []
    for rt in runtimes:
        m = per.get(rt)
        cells += [f"{m['estimated_ms']:.3f}", f"{m['measured_ms']:.3f}", f"{m['error']*100:+.1f}%"] if m else ["", "", ""]
    print(f"| {name} | " + " | ".join(cells) + " |")
print("| **MAPE** | " + " | ".join(f" | | **{mape[rt]*100:.1f}%**" for rt in runtimes) + " |")
PY
