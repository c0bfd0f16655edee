#!/usr/bin/env bash
# Training from a folder of JPEG photographs against the same images decoded in memory:
# MobileNetV1 (width 0.5) at 3x224x224, batch 32, random resized crops and flips in both
# (benches/examples/folder_steps.rs writes the folder from the fixture photographs). The
# output is the table of docs/performance.md, with the machine and date.
#
# Usage: scripts/folder-steps.sh    (IMAGES, default 512; ROUNDS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGES=${IMAGES:-512}
ROUNDS=${ROUNDS:-3}
cargo build --release -q -p slim-benches --example folder_steps
echo "$(date -u +%Y-%m-%d), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "command: IMAGES=$IMAGES ROUNDS=$ROUNDS scripts/folder-steps.sh"
target/release/examples/folder_steps "$IMAGES" "$ROUNDS"
