#!/usr/bin/env bash
# Fashion-MNIST read as a folder of PNG files against the same images read from their IDX
# files: writes the 70,000 images as DIR/train/CLASS/N.png and DIR/test/CLASS/N.png (Python's
# standard library, no imaging package), then trains a model on each, prunes it uniformly by
# half its MACs with one fine-tuning epoch, and quantizes it to int8 (PTQ), printing a
# Markdown table of the test top-1 of each. The folder is read twice: decoded into memory
# (the default cache), and decoded from the files batch by batch (--cache-mb 0).
#
#   scripts/folder-results.sh    (MODEL, default lenet; EPOCHS, default 3; FASHION, default
#                                 /usr/share/datasets/fashion-mnist; OUT, default
#                                 results/folder-MODEL)
set -euo pipefail

MODEL=${MODEL:-lenet}
EPOCHS=${EPOCHS:-3}
FASHION=${FASHION:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-results/folder-$MODEL}

root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q -p slim-cli --manifest-path "$root/Cargo.toml"
slim="$root/target/release/slim"
mkdir -p "$OUT"

if [ ! -f "$OUT/png/.complete" ]; then
  echo "writing Fashion-MNIST as PNG files" >&2
  python3 - "$FASHION" "$OUT/png" <<'PY'
import gzip, os, struct, sys, zlib
src, dst = sys.argv[1], sys.argv[2]
def idx(name):
    data = gzip.open(os.path.join(src, name)).read()
    dims = struct.unpack(">" + "I" * (data[3]), data[4:4 + 4 * data[3]])
    return dims, data[4 + 4 * data[3]:]
def png(path, pixels, h, w):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\0" + pixels[y * w:(y + 1) * w] for y in range(h))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
for split, prefix in (("train", "train"), ("test", "t10k")):
    (n, h, w), pixels = idx(f"{prefix}-images-idx3-ubyte.gz")
    _, labels = idx(f"{prefix}-labels-idx1-ubyte.gz")
    for i in range(n):
        d = os.path.join(dst, split, str(labels[i]))
        os.makedirs(d, exist_ok=True)
        png(os.path.join(d, f"{i:05d}.png"), pixels[i * h * w:(i + 1) * h * w], h, w)
open(os.path.join(dst, ".complete"), "w").close()
PY
fi

run() { # NAME DATA [global options...]
  local name=$1 data=$2
  shift 2
  echo "$name: train, prune, quantize" >&2
  "$slim" train --model "$MODEL" --data "$data" --epochs "$EPOCHS" --lr 0.003 --seed 0 \
    "$@" --out "$OUT/$name.safetensors" -q --json > "$OUT/$name-train.json"
  rm -f "$OUT/$name.safetensors.ckpt"
  "$slim" prune "$OUT/$name.safetensors" --data "$data" --flops-reduction 0.5 \
    --finetune-epochs 1 "$@" --out "$OUT/$name-pruned.safetensors" -q --json > "$OUT/$name-prune.json"
  "$slim" quant ptq "$OUT/$name.safetensors" --data "$data" "$@" \
    --out "$OUT/$name-int8.safetensors" -q --json > "$OUT/$name-ptq.json"
}
run idx "fashion-mnist:$FASHION"
run png "images:$OUT/png" --augment none
run png-files "images:$OUT/png" --augment none --cache-mb 0

python3 - "$OUT" "$MODEL" "$EPOCHS" <<'PY'
import json, sys
out, model, epochs = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name, step):
    return json.load(open(f"{out}/{name}-{step}.json"))
names = ["idx", "png", "png-files"]
def top1(name, step):
    j = load(name, step)
    return j["top1"] if step == "train" else j["after"]["top1"]
def cell(name, step):
    text = f"{top1(name, step) * 100:.2f}%"
    if step == "train":
        text += f" ({sum(e['seconds'] for e in load(name, step)['epochs']):.0f} s)"
    return text
print(f"{model}, Fashion-MNIST (60,000 training, 10,000 test images), test top-1 (training time):\n")
print("| step | IDX files | PNG folder, in memory | PNG folder, decoded per batch |")
print("|---|---:|---:|---:|")
for step, label in (("train", f"trained, {epochs} epochs"), ("prune", "pruned -50% MACs, 1 epoch fine-tuning"), ("ptq", "int8 (PTQ)")):
    print(f"| {label} | " + " | ".join(cell(n, step) for n in names) + " |")
PY
