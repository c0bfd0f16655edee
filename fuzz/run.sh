#!/usr/bin/env bash
# Runs the fuzz targets, each for SECONDS (default 10), from the seed corpora in seeds/ (real
# files: bundled MNIST digits, models, a sensitivity file, a latency table, the ONNX test
# fixtures and, with the test environment, the onnx package's light model-zoo networks and the
# exporter spellings, a study's state and teacher messages, the example pipeline configurations) and
# what earlier runs found (corpus/). A target with a dictionary (TARGET.dict) is given it.
# A crash, a hang or an out-of-memory stops it with the input saved under artifacts/; such
# an input, once fixed, goes to regressions/TARGET/, which `cargo test` replays.
#
#   fuzz/run.sh                 # every target, 10 s each (what CI runs)
#   fuzz/run.sh 1800 onnx idx   # 30 minutes each for two targets
#
# Needs cargo-fuzz (installed here with `cargo install cargo-fuzz` when missing). On a stable
# toolchain it sets RUSTC_BOOTSTRAP=1 for the sanitizer flags that cargo fuzz passes.
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-10}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(model_file idx cifar10 sensitivity latency_table onnx dist_messages config)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  seeds=("seeds/$t")
  if [ "$t" = onnx ]; then
    seeds=(../slim-onnx/tests/fixtures/mnist-conv ../slim-onnx/tests/fixtures/exporter-style)
    # With the test environment (.ci/run makes it): the onnx package's light model-zoo
    # networks, and the exporter spellings the tests write.
    py=../target/onnx-venv/bin/python
    if [ -x "$py" ]; then
      light=$("$py" -c "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend', 'test', 'data', 'light'))" 2>/dev/null || true)
      [ -n "$light" ] && [ -d "$light" ] && seeds+=("$light")
      spellings=$(mktemp -d)
      "$py" ../slim-onnx/tests/ort/spellings.py "$spellings" >/dev/null 2>&1 && seeds+=("$spellings")
    fi
  fi
  [ -d "regressions/$t" ] && seeds+=("regressions/$t")
  extra=()
  [ -f "$t.dict" ] && extra=(-dict="$t.dict")
  echo "== $t: ${SECS} s"
  # Optimized, with debug assertions and overflow checks on (-a): an arithmetic overflow is a
  # finding. 2 GiB of memory, 10 s per input, inputs up to 256 KiB.
  log=$(mktemp)
  rc=0
  cargo fuzz run -O -a "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -max_len=262144 \
    -print_final_stats=1 "${extra[@]}" >"$log" 2>&1 || rc=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Done)|DONE|ERROR|panicked" "$log" || true
  [ -n "${spellings:-}" ] && rm -rf "$spellings" && spellings=
  # `cargo fuzz run` exits non-zero on a finding (or when it cannot run): say so and stop.
  if ls "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
    echo "fuzz target $t found a failing input: see fuzz/artifacts/$t/" >&2
    rm -f "$log"
    exit 1
  fi
  if [ "$rc" -ne 0 ]; then
    tail -n 30 "$log" >&2
    echo "fuzz target $t did not run (status $rc)" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
