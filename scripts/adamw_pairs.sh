#!/usr/bin/env bash
# AdamW at 10M parameters, side by side with torch's fused CPU step: each
# round runs torch `AdamW(fused=True)`, then `keel bench` with the default
# step (gradient scan, skip on NaN), then with `on_nonfinite = "unchecked"`
# (no scan, as torch), one after the other so all three see the same load.
# Prints each round's times, keel/torch and keel's % of its floor, then the
# medians. On a shared machine one round can land in a busy moment; the
# median over rounds is the number.
#
#   scripts/adamw_pairs.sh [ROUNDS] [PARAMS]
#
# The peer: the venv of scripts/peer_bench.py ($PEER_VENV, default
# /work/peers/venv).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-8}"
params="${2:-10000000}"
venv="${PEER_VENV:-/work/peers/venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "needs $venv with torch (see scripts/peer_bench.py)" >&2
  exit 2
fi
cargo build --release --quiet
keel="$PWD/target/release/keel"
unchecked='{"kind": "adamw", "lr": 0.001, "weight_decay": 0.01, "on_nonfinite": "unchecked"}'
checked='{"kind": "adamw", "lr": 0.001, "weight_decay": 0.01}'
rows=$(mktemp)
trap 'rm -f "$rows"' EXIT
for i in $(seq 1 "$rounds"); do
  torch=$("$venv/bin/python" scripts/peer_bench.py --params "$params" --reps 20 --threads 2 \
    --json --which torch_adamw_fused | tail -1)
  a=$("$keel" bench --config "$checked" --params "$params" --steps 20 --threads 2 --json)
  b=$("$keel" bench --config "$unchecked" --params "$params" --steps 20 --threads 2 --json)
  python3 - "$i" "$torch" "$a" "$b" <<'PY' | tee -a "$rows"
import json, sys
i = sys.argv[1]
t, a, b = (json.loads(x) for x in sys.argv[2:5])
t = t["ms_per_step"]
print("round %s: torch %.2f ms | keel %.2f ms, %.3f x torch, %.1f%% of floor | "
      "keel unchecked %.2f ms, %.3f x torch, %.1f%% of floor"
      % (i, t, a["ms_per_step"], a["ms_per_step"] / t, a["pct_of_floor"],
         b["ms_per_step"], b["ms_per_step"] / t, b["pct_of_floor"]))
PY
done
python3 - "$rows" <<'PY'
import re, statistics, sys
rows = open(sys.argv[1]).read().splitlines()
nums = [[float(x) for x in re.findall(r"([0-9.]+)(?= x torch|% of floor)", r)] for r in rows]
med = lambda k: statistics.median(n[k] for n in nums)
print("medians over %d rounds: keel/torch %.3f (%.1f%% of floor); unchecked keel/torch %.3f (%.1f%% of floor)"
      % (len(rows), med(0), med(1), med(2), med(3)))
PY
