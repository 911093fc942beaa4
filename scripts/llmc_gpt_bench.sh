#!/usr/bin/env bash
# Times one GPT training step of keel (`keel bench-gpt`) and of llm.c's
# train_gpt2.c on the same config (B=12, T=64, C=128, L=4, H=4, V=65, f32,
# Tiny Shakespeare chars), alternately, so both see the same machine load.
#
#   LLMC_DIR=/work/peers/llmc scripts/llmc_gpt_bench.sh [ROUNDS] [THREADS]
#
# LLMC_DIR must hold llm.c's train_gpt2.c and llmc/*.h (a checkout of
# karpathy/llm.c, kept outside this repository). The script writes there a
# random-init checkpoint in llm.c's format (model.bin, padded vocab = V = 65,
# so both compute the same logits), the char-level token files llm.c's
# dataloader expects, and a copy of train_gpt2.c with B=12, no sampling and
# 12 steps, built with llm.c's own flags (-Ofast -march=native -fopenmp).
# llm.c's printed step time covers forward, zero_grad, backward and its AdamW
# update (about 1 ms at 0.8M parameters); keel's covers forward, gradient
# zeroing and backward. The median of steps 2..12 is reported.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
threads=${2:-2}
llmc=${LLMC_DIR:?set LLMC_DIR to a directory holding train_gpt2.c of llm.c}
cargo build --release --quiet
keel=$PWD/target/release/keel
corpus=$PWD/data/tinyshakespeare.txt

python3 - "$llmc" "$corpus" <<'PY'
import os, random, struct, sys
llmc, corpus = sys.argv[1], sys.argv[2]
random.seed(0)
maxT, V, L, NH, C, Vp = 64, 65, 4, 4, 128, 65
# llm.c's tensor order: wte wpe ln1w ln1b qkvw qkvb attprojw attprojb ln2w ln2b
# fcw fcb fcprojw fcprojb lnfw lnfb.
sizes = [Vp*C, maxT*C, L*C, L*C, L*3*C*C, L*3*C, L*C*C, L*C, L*C, L*C,
         L*4*C*C, L*4*C, L*C*4*C, L*C, C, C]
with open(os.path.join(llmc, "model.bin"), "wb") as f:
    f.write(struct.pack("<256i", *([20240326, 3, maxT, V, L, NH, C, Vp] + [0]*248)))
    for i, n in enumerate(sizes):
        if i in (2, 8, 14):
            vals = [1.0]*n
        elif i in (3, 5, 7, 9, 11, 13, 15):
            vals = [0.0]*n
        else:
            vals = [random.gauss(0, 0.02) for _ in range(n)]
        f.write(struct.pack("<%df" % n, *vals))
text = open(corpus, encoding="utf-8").read()
index = {c: i for i, c in enumerate(sorted(set(text)))}
ids = [index[c] for c in text]
cut = len(ids) * 9 // 10
d = os.path.join(llmc, "dev/data/tinyshakespeare")
os.makedirs(d, exist_ok=True)
for name, part in (("train", ids[:cut]), ("val", ids[cut:])):
    with open(os.path.join(d, "tiny_shakespeare_%s.bin" % name), "wb") as f:
        f.write(struct.pack("<256i", *([20240520, 1, len(part)] + [0]*253)))
        f.write(struct.pack("<%dH" % len(part), *part))
PY

(
    cd "$llmc"
    sed -e 's/"gpt2_124M.bin"/"model.bin"/' -e 's/int B = 4;/int B = 12;/' \
        -e 's/step <= 40/step <= 12/' -e 's/if (step > 0 && step % 20 == 0)/if (0)/' \
        train_gpt2.c > train_gpt2_bench.c
    gcc -Ofast -march=native -fopenmp -DOMP -I. train_gpt2_bench.c -lm -o train_gpt2_bench
)

for r in $(seq "$rounds"); do
    k=$("$keel" bench-gpt --threads "$threads" --steps 11 --json)
    l=$(cd "$llmc" && OMP_NUM_THREADS=$threads ./train_gpt2_bench |
        sed -n 's/^step \([0-9]*\):.*took \([0-9.]*\) ms.*/\1 \2/p' |
        awk '$1 >= 2 {print $2}' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    python3 - "$k" "$l" "$threads" <<'PY'
import json, sys
k, l, threads = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
tok = 12 * 64
print(f"threads {threads}: keel {k['ms_per_step']:.1f} ms/step {k['tokens_per_s']:.0f} tok/s | "
      f"llm.c {l:.1f} ms/step {tok / l * 1e3:.0f} tok/s | keel/llm.c {l / k['ms_per_step']:.2f}x")
PY
done
