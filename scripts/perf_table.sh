#!/usr/bin/env bash
# Measures every optimizer's CPU step at 10M f32 parameters (one tensor, two
# threads) with `keel bench`, next to its memory floor, and (if the peer venv
# exists) PyTorch's and optax's steps in the same run. Prints Markdown rows
# for docs/performance.md.
#
#   scripts/perf_table.sh [PARAMS] [STEPS]
#   PEER_PYTHON=/work/peers/venv/bin/python scripts/perf_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
params=${1:-10000000}
steps=${2:-20}
peer_python=${PEER_PYTHON:-/work/peers/venv/bin/python}
cargo build --release --quiet
keel=target/release/keel

echo "| optimizer | B/param moved | B/param minimum | ms/step | GB/s | floor ms | % of floor |"
echo "|---|---|---|---|---|---|---|"
for kind in adamw adam sgd lion lamb lars; do
  for dtype in f32 bf16; do
    [ "$dtype" = bf16 ] && [ "$kind" != adamw ] && continue
    $keel bench --optimizer "$kind" --params "$params" --steps "$steps" --threads 2 --dtype "$dtype" --json |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print(f"| {r[\"optimizer\"]} ({r[\"dtype\"]}) | {r[\"bytes_per_param\"]} | {r[\"min_bytes_per_param\"]} | {r[\"ms_per_step\"]:.2f} | {r[\"gb_per_s\"]:.1f} | {r[\"floor_ms\"]:.2f} | {r[\"pct_of_floor\"]:.0f}% |")'
  done
done

if [ -x "$peer_python" ]; then
  echo
  echo "| peer | ms/step | GB/s (28 or 20 B/param) |"
  echo "|---|---|---|"
  "$peer_python" scripts/peer_bench.py --params "$params" --reps "$steps" --threads 2 --json |
    python3 -c 'import json,sys
for line in sys.stdin:
    r=json.loads(line)
    if "error" in r: print(f"| {r[\"impl\"]} | error: {r[\"error\"]} | |"); continue
    print(f"| {r[\"impl\"]} ({r[\"version\"]}) | {r[\"ms_per_step\"]:.2f} | {r[\"gb_per_s\"]:.1f} |")'
fi
