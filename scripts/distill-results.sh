#!/usr/bin/env bash
# The distillation results table: trains a teacher (unless one is given), then trains one
# student alone and once per distillation variant, with the same seed, epochs and schedule,
# once per seed, and prints a Markdown table of the means (top-1, top-5, gain over alone).
#
#   scripts/distill-results.sh          # mobilenet_tiny 0.5 from mobilenet_tiny on bundled MNIST
#   DATA=fashion-mnist:/usr/share/datasets/fashion-mnist TEACHER=path/resnet20.safetensors \
#     STUDENT=mobilenet_v1 WIDTH=0.25 RECIPE="--epochs 3 --optimizer sgd --lr 0.1 \
#     --nesterov --schedule cosine --batch-size 128" \
#     VARIANTS="soft_label=soft_label:temperature=4,t2=true fsp=... l2=..." \
#     scripts/distill-results.sh
#
# Settings (environment): DATA; TEACHER (a model file; default: train TEACHER_MODEL at
# TEACHER_WIDTH with TEACHER_RECIPE); STUDENT and WIDTH (zoo student); RECIPE (slim
# train/distill options shared by every student run); VARIANTS (space-separated
# NAME=LOSS[+LOSS...] entries; `+` joins several --loss); SEEDS (default "0 1"); OUT (working
# folder). Variants whose losses read only the teacher's output train from logits dumped once
# with `slim distill dump` (identical to running the teacher, and cheaper); the others run
# the teacher alongside. A second call with the same OUT keeps the runs the first finished
# (add variants or seeds and only those run). Needs python3 for the table; every figure comes
# from --json output.
set -euo pipefail

DATA=${DATA:-builtin:mnist-10k}
TEACHER_MODEL=${TEACHER_MODEL:-mobilenet_tiny}
TEACHER_WIDTH=${TEACHER_WIDTH:-1.0}
TEACHER_RECIPE=${TEACHER_RECIPE:---epochs 5}
STUDENT=${STUDENT:-mobilenet_tiny}
WIDTH=${WIDTH:-0.5}
RECIPE=${RECIPE:---epochs 5}
VARIANTS=${VARIANTS:-soft_label=soft_label:temperature=2 soft_label+l2=soft_label:temperature=2+l2:teacher=avgpool,student=avgpool,adapter=true}
SEEDS=${SEEDS:-0 1}
OUT=${OUT:-results/distill-$STUDENT}

root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q -p slim-cli --manifest-path "$root/Cargo.toml"
slim="$root/target/release/slim"
mkdir -p "$OUT"

teacher=${TEACHER:-$OUT/teacher.safetensors}
if [ ! -f "$teacher" ]; then
  echo "training the teacher $TEACHER_MODEL x$TEACHER_WIDTH on $DATA" >&2
  # shellcheck disable=SC2086
  "$slim" train --model "$TEACHER_MODEL" --width "$TEACHER_WIDTH" --data "$DATA" \
    $TEACHER_RECIPE --out "$teacher" --quiet --json > "$OUT/teacher-train.json"
fi
"$slim" eval "$teacher" --data "$DATA" --json > "$OUT/teacher.json"
echo "dumping the teacher's logits" >&2
"$slim" distill dump --teacher "$teacher" --data "$DATA" --out "$OUT/knowledge" --quiet \
  --json > "$OUT/dump.json"

# A run whose results are already in OUT (from an earlier, maybe stopped, call with the same
# settings) is not run again: results are written under a temporary name and renamed when
# the run ends.
done_already() {
  if [ -s "$1" ]; then
    echo "  (kept from an earlier call: $1)" >&2
  else
    return 1
  fi
}

for seed in $SEEDS; do
  echo "$STUDENT x$WIDTH alone, seed $seed" >&2
  if ! done_already "$OUT/alone-$seed.json"; then
    # shellcheck disable=SC2086
    "$slim" train --model "$STUDENT" --width "$WIDTH" --data "$DATA" $RECIPE --seed "$seed" \
      --out "$OUT/alone-$seed.safetensors" --quiet --json > "$OUT/alone-$seed.json.part"
    mv "$OUT/alone-$seed.json.part" "$OUT/alone-$seed.json"
  fi
  for v in $VARIANTS; do
    name=${v%%=*}
    losses=()
    source_of_teacher="$OUT/knowledge"
    IFS='+' read -ra parts <<< "${v#*=}"
    for l in "${parts[@]}"; do
      losses+=(--loss "$l")
      # Only a soft label on the default nodes can come from the dumped logits.
      if [[ $l != soft_label* || $l == *teacher=* || $l == *student=* ]]; then
        source_of_teacher=$teacher
      fi
    done
    echo "$STUDENT x$WIDTH distilled by $name, seed $seed" >&2
    done_already "$OUT/$name-$seed.json" && continue
    # shellcheck disable=SC2086
    "$slim" distill --teacher "$source_of_teacher" --student-model "$STUDENT" --width "$WIDTH" \
      --data "$DATA" "${losses[@]}" $RECIPE --seed "$seed" --out "$OUT/$name-$seed.safetensors" \
      --quiet --json > "$OUT/$name-$seed.json.part"
    mv "$OUT/$name-$seed.json.part" "$OUT/$name-$seed.json"
  done
done

python3 - "$OUT" "$STUDENT" "$WIDTH" "$DATA" "$SEEDS" "$VARIANTS" <<'PY'
import json, sys, statistics as st
out, student, width, data, seeds, variants = sys.argv[1:7]
seeds, names = seeds.split(), [v.split("=", 1)[0] for v in variants.split()]
specs = {v.split("=", 1)[0]: v.split("=", 1)[1].replace("+", " + ") for v in variants.split()}
t = json.load(open(f"{out}/teacher.json"))
dump = json.load(open(f"{out}/dump.json"))
def load(name):
    return [json.load(open(f"{out}/{name}-{s}.json")) for s in seeds]
alone = load("alone")
secs = lambda runs: st.mean(e["seconds"] for r in runs for e in r["epochs"])
base = st.mean(r["top1"] for r in alone) * 100
print(f"{student} x{width} on {data}; teacher {t['model']} top-1 {t['top1']*100:.2f}%; "
      f"mean of {len(seeds)} seeds ({', '.join(seeds)}); logits dumped in {dump['seconds']:.0f} s\n")
print("| Student | Losses | top-1 | top-5 | gain | top-1 per seed | s/epoch |")
print("|---|---|---|---|---|---|---|")
def row(name, spec, runs):
    t1 = [r["top1"] * 100 for r in runs]
    t5 = st.mean(r["top5"] for r in runs) * 100
    gain = "-" if name == "alone" else f"{st.mean(t1) - base:+.2f} pt"
    print(f"| {name} | {spec} | {st.mean(t1):.2f}% | {t5:.2f}% | {gain} | "
          + " / ".join(f"{x:.2f}" for x in t1) + f" | {secs(runs):.1f} |")
row("alone", "cross-entropy", alone)
for n in names:
    row(n, "cross-entropy + " + specs[n], load(n))
PY
