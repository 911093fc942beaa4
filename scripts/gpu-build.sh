#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh runs on a GPU machine (which has no
# Rust): the `keel` binary and the CUDA test binaries, with feature `cuda`,
# copied into the git-ignored .gpu/ folder with the scripts and test data
# they need.
#
#   scripts/gpu-build.sh     # then carry .gpu/ to the GPU machine and run
#                            # scripts/gpu-check.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features cuda
# The test binaries' names carry a hash: take them from cargo's JSON.
tests=$(cargo test --release --features cuda --no-run --message-format=json \
          --test cuda --test cuda_kernels_compile |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
rm -rf .gpu
mkdir -p .gpu/tests .gpu/data
cp target/release/keel .gpu/keel
while read -r name exe; do
  cp "$exe" ".gpu/tests/$name"
done <<< "$tests"
cp -r tests/data/conformance .gpu/data/conformance
cp scripts/torch_cuda_bench.py .gpu/
strip .gpu/keel .gpu/tests/* 2>/dev/null || true
du -sh .gpu
ls -l .gpu .gpu/tests
