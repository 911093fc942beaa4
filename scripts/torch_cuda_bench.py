#!/usr/bin/env python3
"""torch AdamW on CUDA, timed like `keel bench --device cuda`, for the table
of scripts/gpu-check.sh.

Times torch.optim.AdamW(fused=True) and AdamW(foreach=True) steps over
float32 parameters on one GPU (same total size and tensor split as keel's
bench: equal sizes, or with --mixed-sizes sizes proportional to 2**(i % 12)),
median over --steps after --warmup, each step followed by
torch.cuda.synchronize(). Prints one JSON object per implementation.

    python3 scripts/torch_cuda_bench.py --params 100000000 --tensors 1
"""
import argparse
import json
import statistics
import time

import torch


def sizes(params, tensors, mixed):
    if not mixed:
        base = params // tensors
        v = [base] * tensors
        v[-1] += params - base * tensors
        return v
    w = [1 << (i % 12) for i in range(tensors)]
    total = sum(w)
    v = [max(1, params * x // total) for x in w]
    big = max(range(tensors), key=lambda i: v[i])
    v[big] = max(1, v[big] + params - sum(v))
    return v


def bench(impl, shape_sizes, steps, warmup):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.rand(n, device="cuda", generator=gen) * 2 - 1 for n in shape_sizes]
    params = [torch.nn.Parameter(p) for p in params]
    for p in params:
        p.grad = (torch.rand(p.numel(), device="cuda", generator=gen) * 2 - 1) * 0.01
    kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kwargs)
    times = []
    for k in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--mixed-sizes", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    sz = sizes(a.params, a.tensors, a.mixed_sizes)
    for impl in ("fused", "foreach"):
        times = bench(impl, sz, a.steps, a.warmup)
        ms = statistics.median(times)
        print(json.dumps({
            "impl": f"torch AdamW {impl}",
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "params": a.params,
            "tensors": a.tensors,
            "ms_per_step": ms,
            "min_ms": min(times),
            # torch's minimum traffic, like keel's min_bytes_per_param (28 B).
            "gb_per_s": 28 * a.params / (ms * 1e-3) / 1e9,
        }))
        del times
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
