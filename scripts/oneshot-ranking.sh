#!/usr/bin/env bash
# Does the supernet rank candidates as training them alone does? Trains a one-shot supernet,
# lets a hot annealing search (it accepts almost any move, so it wanders) score candidates
# with inherited weights, then trains six of them, spread over the supernet's ranking, alone
# with one short recipe, and prints both rankings and Kendall's tau between them.
#
#   scripts/oneshot-ranking.sh     # ResNet space, width 0.25, on a Fashion-MNIST subset
#
# Settings (environment): DATA, SPACE, WIDTH, SUPERNET (options of `slim nas oneshot`),
# ALONE (options of `slim train` for each stand-alone run), OUT. Needs python3.
set -euo pipefail

DATA=${DATA:-fashion-mnist:/usr/share/datasets/fashion-mnist}
SPACE=${SPACE:-resnet}
WIDTH=${WIDTH:-0.25}
SUPERNET=${SUPERNET:---supernet-epochs 8 --train-images 8000 --eval-images 2000 --lr 0.003 --iterations 20 --init-temperature 1 --reduce-rate 1}
ALONE=${ALONE:---epochs 3 --limit 8000 --lr 0.003 --schedule cosine}
OUT=${OUT:-oneshot-ranking}
SLIM=${SLIM:-target/release/slim}

if [ ! -x "$SLIM" ]; then
  cargo build --release -p slim-cli
fi
mkdir -p "$OUT"
t0=$(date +%s)
"$SLIM" nas oneshot --space "$SPACE" --width "$WIDTH" --data "$DATA" $SUPERNET \
  --out "$OUT/search" --json -q > "$OUT/search.json"
t1=$(date +%s)
# Six ranks spread over the distinct candidates the search scored.
ranks=$(python3 - "$OUT/search.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
seen, n = set(), 0
for c in v["history"]:
    if c["status"] == "evaluated" and tuple(c["tokens"]) not in seen:
        seen.add(tuple(c["tokens"])); n += 1
k = min(6, n)
print(" ".join(str(1 + round(i * (n - 1) / max(k - 1, 1))) for i in range(k)))
PY
)
for r in $ranks; do
  "$SLIM" nas export "$OUT/search" --rank "$r" --out "$OUT/rank$r.safetensors" --json -q > "$OUT/rank$r-export.json"
  "$SLIM" train --model "$OUT/rank$r.safetensors" --data "$DATA" $ALONE \
    --out "$OUT/rank$r-trained.safetensors" --json -q > "$OUT/rank$r-train.json"
done
t2=$(date +%s)
echo "supernet and search $((t1 - t0)) s, six stand-alone trainings $((t2 - t1)) s" >&2
python3 - "$OUT" $ranks <<'PY'
import json, sys
out, ranks = sys.argv[1], sys.argv[2:]
rows = []
for r in ranks:
    e = json.load(open(f"{out}/rank{r}-export.json"))["candidate"]
    t = json.load(open(f"{out}/rank{r}-train.json"))
    rows.append((int(r), e["arch"], e["macs"], e["reward"], t["top1"]))
def tau(a, b):
    s = p = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            p += 1
            x, y = a[i] - a[j], b[i] - b[j]
            if x and y:
                s += 1 if (x > 0) == (y > 0) else -1
    return s / p if p else 0.0
print("| supernet rank | architecture | MACs | top-1 with supernet weights | top-1 trained alone |")
print("|---:|---|---:|---:|---:|")
for r, arch, macs, rew, top1 in rows:
    print(f"| {r} | {arch} | {macs:,} | {rew*100:.2f}% | {top1*100:.2f}% |")
print()
print(f"Kendall tau: {tau([r[3] for r in rows], [r[4] for r in rows]):.2f}")
PY
