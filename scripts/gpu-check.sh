#!/usr/bin/env bash
# The GPU check: runs on a machine with an NVIDIA GPU, the driver, the CUDA
# toolkit (nvcc, ptxas, libnvrtc) and python3 with torch, but no Rust. Uses the
# binaries scripts/gpu-build.sh put in .gpu/.
#
# 1. the kernel compile check (NVRTC + ptxas, zero spills) on this machine;
# 2. the GPU tests (tests/cuda.rs): conformance on cuda-f32 (Muon and Shampoo
#    included), 10M random elements against the CPU f32 path, Muon and
#    Shampoo against the f64 CPU path, bf16, NaN skip, state round trips;
#    a "skipped: no CUDA device" here is a failure;
# 3. benchmarks: device-to-device copy bandwidth; keel AdamW/LAMB/LARS/Lion
#    at 1M, 100M and 1B parameters and on a 500-tensor mixed-size set, next
#    to torch AdamW(fused=True) and AdamW(foreach=True); Muon and Shampoo
#    (frequency 1 and 10) on the gpt-small shapes, with AdamW on the same
#    shapes (model.jsonl);
# and writes everything under $OUT (default .gpu/out): gpu-report.md (the
# table), the raw JSON lines and the test logs. Exits non-zero if a test failed.
#
#   OUT=/some/dir scripts/gpu-check.sh [--quick]   # --quick: no 1B runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
quick=${1:-}
keel=.gpu/keel
status=0

# libnvrtc, libcublas, libcusolver (and its libcusparse, libnvJitLink): the
# toolkit's, else torch's wheels'.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
torch_libs=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for lib in ("nvrtc", "cublas", "cusolver", "cusparse", "nvJitLink") for p in glob.glob(os.path.join(list(nvidia.__path__)[0], "**/lib" + lib + ".so*"), recursive=True)})))' 2>/dev/null || true)
[ -n "$torch_libs" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$torch_libs"
export KEEL_PTXAS=${KEEL_PTXAS:-$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)}
export KEEL_CASE_DIR=.gpu/data/conformance

{ nvidia-smi; echo; nvidia-smi -q | grep -iE 'product name|driver version|cuda version|clocks|bus'; } \
  > "$OUT/nvidia-smi.txt" 2>&1

echo "== kernel compile check"
KEEL_REQUIRE_NVRTC=1 KEEL_REGISTER_TABLE="$OUT/registers.md" \
  .gpu/tests/cuda_kernels_compile --nocapture > "$OUT/kernels-compile.txt" 2>&1 || status=1
tail -3 "$OUT/kernels-compile.txt"

echo "== GPU tests"
.gpu/tests/cuda --test-threads=1 --nocapture > "$OUT/gpu-tests.txt" 2>&1 || status=1
if grep -q "skipped: no CUDA device" "$OUT/gpu-tests.txt"; then
  echo "FAIL: the GPU tests found no device"; status=1
fi
tail -3 "$OUT/gpu-tests.txt"

echo "== benchmarks"
json="$OUT/bench.jsonl"
: > "$json"
sizes="1000000 100000000"
[ "$quick" = "--quick" ] || sizes="$sizes 1000000000"
for n in $sizes; do
  steps=20; [ "$n" -ge 1000000000 ] && steps=10
  for kind in adamw lamb lars lion; do
    $keel bench --device cuda --optimizer "$kind" --params "$n" --steps "$steps" --json \
      >> "$json" 2>> "$OUT/bench-errors.txt" || status=1
  done
  python3 .gpu/torch_cuda_bench.py --params "$n" --steps "$steps" >> "$json" \
    2>> "$OUT/bench-errors.txt" || status=1
done
for kind in adamw lamb lars lion; do
  $keel bench --device cuda --optimizer "$kind" --params 100000000 --tensors 500 --mixed-sizes \
    --json >> "$json" 2>> "$OUT/bench-errors.txt" || status=1
done
python3 .gpu/torch_cuda_bench.py --params 100000000 --tensors 500 --mixed-sizes >> "$json" \
  2>> "$OUT/bench-errors.txt" || status=1

# Muon and Shampoo on the GPT's shapes (each with AdamW on the same shapes).
model="$OUT/model.jsonl"
: > "$model"
$keel bench --device cuda --model gpt-small --optimizer muon --steps 10 --json \
  >> "$model" 2>> "$OUT/bench-errors.txt" || status=1
for f in 1 10; do
  $keel bench --device cuda --model gpt-small --optimizer shampoo --steps 10 --json \
    --config "{\"kind\": \"shampoo\", \"lr\": 0.001, \"precondition_frequency\": $f, \"grafting\": {\"kind\": \"adam\"}}" \
    >> "$model" 2>> "$OUT/bench-errors.txt" || status=1
done

python3 - "$json" "$model" > "$OUT/gpu-report.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
dev = next((r["device"] for r in rows if "device" in r), "?")
bw = max((r["floor_gb_per_s"] for r in rows if "floor_gb_per_s" in r), default=float("nan"))
print(f"# keel on {dev}\n")
print(f"Device-to-device copy bandwidth (read + write): **{bw:.0f} GB/s**.\n")
print("| params | tensors | implementation | ms/step | GB/s (min traffic) | % of copy bandwidth |")
print("|---|---|---|---|---|---|")
for r in rows:
    name = r.get("impl") or f'keel {r["optimizer"]}'
    ms = r["ms_per_step"]
    gbs = r.get("min_bytes_per_param", 28) * r["params"] / (ms * 1e-3) / 1e9
    print(f'| {r["params"]:,} | {r["tensors"]} | {name} | {ms:.3f} | {gbs:.0f} | {100 * gbs / bw:.0f}% |')
model = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
if model:
    print("\nMatrix optimizers on the gpt-small shapes (amortized ms per step):\n")
    print("| optimizer | precondition frequency | ms/step | AdamW ms/step | ratio |")
    print("|---|---|---|---|---|")
    for r in model:
        print(f'| {r["optimizer"]} | {r["precondition_frequency"]} | {r["ms_per_step"]:.2f} | '
              f'{r["adamw_ms_per_step"]:.3f} | {r["ratio_to_adamw"]:.1f}x |')
PY
if [ -s "$OUT/bench-errors.txt" ]; then
  { echo; echo "Errors:"; echo '```'; tail -20 "$OUT/bench-errors.txt"; echo '```'; } >> "$OUT/gpu-report.md"
fi
cat "$OUT/gpu-report.md"
exit $status
