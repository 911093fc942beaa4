#!/usr/bin/env bash
# The gpt-small table of docs/performance.md: keel's amortized step for
# AdamW, Shampoo (frequency 1, 10, 100; f64 roots and roots in the factors'
# precision), Muon (+AdamW) and SOAP, then the peers (DistributedShampoo,
# torch.optim.Muon with f32 Newton-Schulz, torch fused AdamW) when their
# Python environment exists. Prints Markdown rows.
#
#   scripts/second_order_table.sh [THREADS]
#
# Peers: the venv of scripts/peer_bench.py and facebookresearch/optimizers
# checked out at $OPTIMIZERS (default /work/peers/optimizers).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
venv="${PEER_VENV:-/work/peers/venv}"
optimizers="${OPTIMIZERS:-/work/peers/optimizers}"
cargo build --release --quiet
keel=target/release/keel

shampoo() { # frequency root_dtype
  printf '{"kind": "shampoo", "lr": 0.001, "precondition_frequency": %s, "grafting": {"kind": "adam", "beta2": 0.999, "eps": 1e-10}, "root_dtype": "%s"}' "$1" "$2"
}

row() { # label steps config-json
  local json
  json=$("$keel" bench --model gpt-small --threads "$threads" --steps "$2" --warmup 1 --config "$3" --json)
  python3 - "$1" "$json" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
ratio = r.get("ratio_to_adamw")
print("| keel %s | %.1f | %s |" % (sys.argv[1], r["ms_per_step"], "%.1fx" % ratio if ratio else "1x"))
PY
}

echo "| optimizer (gpt-small, $threads threads) | ms/step (amortized) | vs AdamW |"
echo "|---|---|---|"
row "adamw" 20 '{"kind": "adamw", "lr": 0.001}'
for f in 1 10 100; do
  steps=$(( f == 1 ? 3 : f ))
  row "shampoo f$f (f64 roots)" "$steps" "$(shampoo "$f" f64)"
  row "shampoo f$f (roots in f32)" "$steps" "$(shampoo "$f" factor)"
done
row "muon (+adamw)" 5 '{"kind": "muon", "lr": 0.001}'
row "soap f10" 10 '{"kind": "soap", "lr": 0.001}'

if [ -x "$venv/bin/python" ] && [ -d "$optimizers/distributed_shampoo" ]; then
  PYTHONPATH="$optimizers" "$venv/bin/python" scripts/peer_second_order.py --threads "$threads" \
    --which adamw,shampoo_f1,shampoo_f10,shampoo_f100,muon_f32 --json |
    python3 -c "$(cat <<'PY'
import json, sys
rows = [json.loads(line) for line in sys.stdin]
base = next((r["ms_per_step"] for r in rows if r["impl"] == "adamw"), None)
for r in rows:
    ratio = "%.1fx" % (r["ms_per_step"] / base) if base else ""
    print("| torch %s | %.1f | %s |" % (r["impl"], r["ms_per_step"], ratio))
PY
)"
else
  echo "(peers skipped: no $venv or $optimizers)" >&2
fi
