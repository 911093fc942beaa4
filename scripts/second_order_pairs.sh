#!/usr/bin/env bash
# Side-by-side pairs on the gpt-small shapes: the peer (DistributedShampoo
# or torch.optim.Muon with f32 Newton-Schulz), then keel with the same
# settings (Shampoo roots in the factors' precision, as DistributedShampoo
# computes them), alternating, so both see the same load. Prints each pair's
# times and keel / peer, then the median ratio. On a shared machine one run
# can land in a busy moment; the median of several pairs is the number.
#
#   scripts/second_order_pairs.sh [PAIRS] [shampoo_f1|shampoo_f10|shampoo_f100|muon_f32]
#
# Peers: the venv of scripts/peer_bench.py ($PEER_VENV, default
# /work/peers/venv) and facebookresearch/optimizers at $OPTIMIZERS (default
# /work/peers/optimizers), run from a folder outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs="${1:-5}"
which="${2:-shampoo_f1}"
venv="${PEER_VENV:-/work/peers/venv}"
optimizers="${OPTIMIZERS:-/work/peers/optimizers}"
if [ ! -x "$venv/bin/python" ] || [ ! -d "$optimizers/distributed_shampoo" ]; then
  echo "needs $venv (torch) and $optimizers (facebookresearch/optimizers)" >&2
  exit 2
fi
case "$which" in
  shampoo_f1 | shampoo_f10 | shampoo_f100)
    f="${which#shampoo_f}"
    steps=$(( f == 1 ? 3 : f ))
    config=$(printf '{"kind": "shampoo", "lr": 0.001, "precondition_frequency": %s, "grafting": {"kind": "adam", "beta2": 0.999, "eps": 1e-10}, "root_dtype": "factor"}' "$f")
    ;;
  muon_f32)
    steps=5
    config='{"kind": "muon", "lr": 0.001}'
    ;;
  *)
    echo "unknown peer '$which' (shampoo_f1, shampoo_f10, shampoo_f100, muon_f32)" >&2
    exit 2
    ;;
esac
cargo build --release --quiet
keel="$PWD/target/release/keel"
script="$PWD/scripts/peer_second_order.py"
outside=$(mktemp -d)
trap 'rm -rf "$outside"' EXIT

ratios=()
for i in $(seq 1 "$pairs"); do
  # The peer's warnings go to a log, shown only when it fails.
  peer=$(cd "$outside" && PYTHONPATH="$optimizers" "$venv/bin/python" "$script" \
    --threads 2 --which "$which" --json 2>"$outside/peer.log" | tail -1) ||
    { cat "$outside/peer.log" >&2; exit 1; }
  ours=$("$keel" bench --model gpt-small --threads 2 --steps "$steps" --warmup 1 \
    --config "$config" --json | tail -1)
  ratio=$(python3 - "$peer" "$ours" <<'PY'
import json, sys
peer, ours = (json.loads(a)["ms_per_step"] for a in sys.argv[1:3])
print("%.3f %.0f %.0f" % (ours / peer, peer, ours))
PY
)
  read -r r peer_ms keel_ms <<<"$ratio"
  echo "pair $i: peer $peer_ms ms, keel $keel_ms ms, keel/peer $r (load $(cut -d' ' -f1 /proc/loadavg))"
  ratios+=("$r")
done
printf '%s\n' "${ratios[@]}" | python3 -c '
import statistics, sys
r = sorted(float(x) for x in sys.stdin)
print("keel/peer over %d pairs: median %.3f, %d of %d at most 0.5" % (len(r), statistics.median(r), sum(x <= 0.5 for x in r), len(r)))
'
