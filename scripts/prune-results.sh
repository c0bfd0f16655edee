#!/usr/bin/env bash
# The pruning results table: trains a baseline, measures its sensitivities, prunes it to a
# FLOPs target uniformly, from sensitivities and by automatic search (each followed by the
# same fine-tuning), once per seed, and prints a Markdown table of the means.
#
#   scripts/prune-results.sh                      # mobilenet_tiny on the bundled MNIST subset
#   MODEL=lenet scripts/prune-results.sh
#   MODEL=resnet20 DATA=fashion-mnist:/usr/share/datasets/fashion-mnist \
#     TRAIN="--epochs 3 --batch-size 128 --optimizer sgd --lr 0.1 --nesterov --schedule cosine" \
#     FINETUNE="--finetune-epochs 2 --optimizer sgd --lr 0.02 --batch-size 128" \
#     EVAL_SAMPLES=2000 scripts/prune-results.sh
#
# Settings (environment): MODEL, DATA, TRAIN (slim train options), FLOPS (the reduction,
# default 0.5), FINETUNE (slim prune options), SEEDS (default "0 1 2"), TRIALS (automatic
# search evaluations, default 30), REWARD_FT (training images each search candidate is
# fine-tuned on before its reward, default 1024), EVAL_SAMPLES (test images for sensitivities and search
# rewards; default all), OUT (working folder, default results/MODEL). Needs python3 for the
# table. Everything it runs is a `slim` command; every figure comes from their --json output.
set -euo pipefail

MODEL=${MODEL:-mobilenet_tiny}
DATA=${DATA:-builtin:mnist-10k}
TRAIN=${TRAIN:---epochs 5 --lr 0.003 --batch-size 64 --optimizer adam}
FLOPS=${FLOPS:-0.5}
FINETUNE=${FINETUNE:---finetune-epochs 2 --lr 0.003 --optimizer adam}
SEEDS=${SEEDS:-0 1 2}
TRIALS=${TRIALS:-30}
REWARD_FT=${REWARD_FT:-1024}
EVAL=${EVAL_SAMPLES:+--eval-samples $EVAL_SAMPLES}
OUT=${OUT:-results/$MODEL}

root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q -p slim-cli --manifest-path "$root/Cargo.toml"
slim="$root/target/release/slim"
mkdir -p "$OUT"

base="$OUT/baseline.safetensors"
if [ ! -f "$base" ]; then
  echo "training the $MODEL baseline on $DATA" >&2
  # shellcheck disable=SC2086
  "$slim" train --model "$MODEL" --data "$DATA" $TRAIN --out "$base" --quiet --json \
    > "$OUT/baseline.json"
fi
"$slim" eval "$base" --data "$DATA" --json > "$OUT/baseline-eval.json"

echo "sensitivity analysis" >&2
# shellcheck disable=SC2086
"$slim" sensitivity "$base" --data "$DATA" $EVAL --out "$OUT/sens.json" \
  --plot "$OUT/sens.svg" --quiet --json > "$OUT/sensitivity.json"

for seed in $SEEDS; do
  for method in uniform sensitivity auto; do
    extra=()
    [ "$method" != uniform ] && extra=(--sensitivity "$OUT/sens.json")
    [ "$method" = auto ] && extra+=(--trials "$TRIALS" --history "$OUT/auto-$seed.search.json" \
      --reward-finetune-images "$REWARD_FT")
    echo "$method pruning, seed $seed" >&2
    # shellcheck disable=SC2086
    "$slim" prune "$base" --data "$DATA" --flops-reduction "$FLOPS" --method "$method" \
      "${extra[@]}" $FINETUNE $EVAL --seed "$seed" --out "$OUT/$method-$seed.safetensors" \
      --quiet --json > "$OUT/$method-$seed.json"
  done
done

python3 - "$OUT" "$MODEL" "$DATA" "$SEEDS" <<'PY'
import json, sys, statistics as st
out, model, data, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
base = json.load(open(f"{out}/baseline-eval.json"))
sens = json.load(open(f"{out}/sensitivity.json"))
rows = []
first = json.load(open(f"{out}/uniform-{seeds[0]}.json"))
b = first["before"]
print(f"{model} on {data}: baseline top-1 {base['top1']*100:.2f}%, "
      f"{b['macs']/1e6:.2f} M MACs, {b['params']/1e3:.1f} K params, {b['bytes']/1e3:.1f} KB; "
      f"sensitivity analysis {sens['points']} points in {sens['seconds']:.0f} s\n")
print("| Method | FLOPs | model size | top-1 change | top-1 (mean of "
      f"{len(seeds)}) | top-1 per seed |")
print("|---|---|---|---|---|---|")
print(f"| baseline | {b['macs']/1e6:.2f} M | {b['bytes']/1e3:.1f} KB | - | "
      f"{base['top1']*100:.2f}% | - |")
for method in ["uniform", "sensitivity", "auto"]:
    runs = [json.load(open(f"{out}/{method}-{s}.json")) for s in seeds]
    macs = st.mean(r["after"]["macs"] for r in runs)
    size_b = st.mean(r["after"]["bytes"] for r in runs)
    t = [r["after"]["top1"] * 100 for r in runs]
    flops = (macs / b["macs"] - 1) * 100
    size = (size_b / b["bytes"] - 1) * 100
    mean = st.mean(t)
    print(f"| {method} | {flops:+.1f}% ({macs/1e6:.2f} M) | {size:+.1f}% "
          f"({size_b/1e3:.1f} KB) | {mean - base['top1']*100:+.2f} pt | {mean:.2f}% | "
          + " / ".join(f"{x:.2f}" for x in t) + " |")
PY
