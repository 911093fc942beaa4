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
row() {
  python3 -c '
import json, sys
r = json.load(sys.stdin)
cells = [sys.argv[1], r["bytes_per_param"], r["min_bytes_per_param"], "%.2f" % r["ms_per_step"],
         "%.1f" % r["gb_per_s"], "%.2f" % r["floor_ms"], "%.0f%%" % r["pct_of_floor"]]
print("| " + " | ".join(str(c) for c in cells) + " |")' "$1"
}
bench() { $keel bench --params "$params" --steps "$steps" --threads 2 --json "$@"; }
for kind in adamw adam sgd lion lamb lars; do
  bench --optimizer "$kind" | row "$kind"
done
bench --config '{"kind": "adamw", "lr": 0.001, "clip_global_norm": 1.0}' | row "adamw + clip_global_norm"
bench --config '{"kind": "adamw", "lr": 0.001, "update_clip_rms": 1.0}' | row "adamw + update_clip_rms"
bench --optimizer adamw --dtype bf16 | row "adamw, bf16 params"
bench --optimizer adamw --tensors 100 | row "adamw, 100 tensors"

if [ -x "$peer_python" ]; then
  echo
  echo "| peer | ms/step | GB/s (at 28 or 20 B/param) |"
  echo "|---|---|---|"
  "$peer_python" scripts/peer_bench.py --params "$params" --reps "$steps" --threads 2 --json |
    python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if "error" in r:
        print("| %s | error: %s | |" % (r["impl"], r["error"]))
    else:
        print("| %s (%s) | %.2f | %.1f |" % (r["impl"], r["version"], r["ms_per_step"], r["gb_per_s"]))'
fi
