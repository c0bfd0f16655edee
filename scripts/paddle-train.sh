#!/usr/bin/env bash
# PaddlePaddle 2.6.2's top-1 on the training recipe of docs/results.md (scripts/paddle_train.py), one
# run per seed, beside Slim's on the same seeds. Paddle is installed from PyPI into
# target/paddle-venv the first time (about 200 MB), as for scripts/paddle-inference.sh.
#
#   scripts/paddle-train.sh [MODEL] [SEEDS...]    # default: mobilenet_tiny 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-mobilenet_tiny}
shift || true
if [ $# -gt 0 ]; then SEEDS=("$@"); else SEEDS=(0 1 2); fi
case "$MODEL" in
    mobilenet_tiny|lenet) ;;
    *) echo "paddle-train.sh: unknown model \`$MODEL' (mobilenet_tiny or lenet)" >&2; exit 2 ;;
esac
for seed in "${SEEDS[@]}"; do
    [[ "$seed" =~ ^[0-9]+$ ]] || { echo "paddle-train.sh: seed \`$seed' is not a whole number" >&2; exit 2; }
done
VENV=target/paddle-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import paddle" 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q paddlepaddle==2.6.2 numpy
fi
# Paddle's warnings go to standard error; its per-epoch lines are dropped.
(cd scripts && "../$VENV/bin/python" -W ignore paddle_train.py "$MODEL" "${SEEDS[@]}" | grep -v epoch)
cargo build --release -q -p slim-cli
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for seed in "${SEEDS[@]}"; do
    top1=$(target/release/slim train --model "$MODEL" --epochs 5 --batch-size 64 --lr 0.003 \
        --optimizer adam --seed "$seed" --out "$out/m.safetensors" --quiet --json \
        | python3 -c 'import json,sys; print("%.2f" % (100 * json.load(sys.stdin)["epochs"][-1]["test"]["top1"]))')
    echo "slim $MODEL seed $seed: top-1 $top1%"
done
