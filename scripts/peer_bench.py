#!/usr/bin/env python3
"""Peer benchmark: PyTorch and optax CPU optimizer steps, for comparison with keel.

Times a single optimizer step over ONE float32 parameter buffer of N elements
(with a fixed random gradient) for each peer implementation, and reports the
median and minimum wall time per step plus an effective memory bandwidth.

Implementations (--which):
  torch_adamw_fused    torch.optim.AdamW(lr=1e-3, weight_decay=0.01, fused=True)
  torch_adamw_fused_clip  torch.nn.utils.clip_grad_norm_(max_norm=1.0) then the fused step
  torch_adamw_foreach  torch.optim.AdamW(lr=1e-3, weight_decay=0.01, foreach=True)
  optax_adamw          optax.adamw(1e-3, weight_decay=0.01)
  optax_lamb           optax.lamb(1e-3, weight_decay=0.01)
  optax_lars           optax.lars(1e-3, weight_decay=0.01, momentum=0.9)

The optax steps are jax.jit-compiled (opt.update + optax.apply_updates), with
the params and optimizer state buffers donated, and block_until_ready() is
called on every step so the timing covers the whole computation.

Each implementation runs in its own child process, so that thread pools,
allocators and environment variables (XLA_FLAGS must be set before jax is
imported) do not leak from one implementation into another. When --threads is
lower than the number of CPUs available, the child is also pinned to the first
T CPUs (os.sched_setaffinity), as XLA's CPU thread pool is sized from the CPUs
it may run on rather than from any flag.

bytes_per_param is a minimal memory-traffic model for one step, in float32:
  adamw, lamb: read p, g, m, v + write p, m, v = 7 * 4 = 28 bytes
  lars:        read p, g, m    + write p, m    = 5 * 4 = 20 bytes
(lamb and lars also need norm reductions, i.e. extra passes; the model counts
only the minimal traffic.) gb_per_s = bytes_per_param * N / median time / 1e9.

Set-up (outside the repository; PyPI only):

    python3 -m venv /work/peers/venv
    /work/peers/venv/bin/pip install --upgrade pip
    /work/peers/venv/bin/pip install torch        # pulls the nvidia-*/cuda-* wheels (~5 GB); CPU use is fine
    /work/peers/venv/bin/pip install 'jax[cpu]' optax
    /work/peers/venv/bin/python -c "import torch, jax, optax"

    (`pip install --no-deps torch` alone is NOT enough: the PyPI linux wheel
    preloads libcublasLt at import time and fails without the nvidia wheels.)

Run:

    /work/peers/venv/bin/python scripts/peer_bench.py                       # 10M params, 20 reps, 2 threads, table
    /work/peers/venv/bin/python scripts/peer_bench.py --params 1000000 --reps 5
    /work/peers/venv/bin/python scripts/peer_bench.py --json --which optax_adamw torch_adamw_fused

With --json, one JSON object per line is printed:
    {"impl": ..., "params": N, "ms_per_step": median, "min_ms": ...,
     "bytes_per_param": ..., "gb_per_s": ..., "threads": T, "reps": R,
     "warmup": 3, "version": "..."}
A failing implementation prints {"impl": ..., "error": "..."} instead.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ALL_IMPLS = [
    "torch_adamw_fused",
    "torch_adamw_fused_clip",
    "torch_adamw_foreach",
    "optax_adamw",
    "optax_lamb",
    "optax_lars",
]

BYTES_PER_PARAM = {
    "torch_adamw_fused": 28,
    "torch_adamw_fused_clip": 28,
    "torch_adamw_foreach": 28,
    "optax_adamw": 28,
    "optax_lamb": 28,
    "optax_lars": 20,
}

WARMUP = 3
LR = 1e-3
WEIGHT_DECAY = 0.01


def _thread_env(threads):
    """Environment variables that cap thread pools, for the child process."""
    t = str(threads)
    env = dict(os.environ)
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
    ):
        env[var] = t
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={t}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _pin(threads):
    """Restrict this process to `threads` CPUs when fewer than available."""
    if not hasattr(os, "sched_getaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def _random_f32(n, seed):
    import numpy as np

    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def _summary(times_s):
    return statistics.median(times_s) * 1e3, min(times_s) * 1e3


def bench_torch(impl, n, reps, threads):
    import torch

    torch.set_num_threads(threads)
    p = torch.nn.Parameter(torch.from_numpy(_random_f32(n, 0)))
    p.grad = torch.from_numpy(_random_f32(n, 1))
    clip = impl.endswith("_clip")
    if impl in ("torch_adamw_fused", "torch_adamw_fused_clip"):
        opt = torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    elif impl == "torch_adamw_foreach":
        opt = torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    else:
        raise ValueError(impl)

    g0 = p.grad.clone() if clip else None
    times = []
    with torch.no_grad():
        for i in range(WARMUP + reps):
            if clip:
                # The grads are rescaled in place: restore them untimed.
                p.grad.copy_(g0)
            t0 = time.perf_counter()
            if clip:
                torch.nn.utils.clip_grad_norm_([p], 1.0, foreach=True)
            opt.step()
            t1 = time.perf_counter()
            if i >= WARMUP:
                times.append(t1 - t0)
    if not torch.isfinite(p).all():
        raise RuntimeError("non-finite parameters after the timed steps")
    return times, f"torch {torch.__version__}"


def bench_optax(impl, n, reps, threads):
    import warnings

    warnings.filterwarnings("ignore", message=".*donated.*")
    import jax
    import jax.numpy as jnp
    import optax

    if impl == "optax_adamw":
        opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    elif impl == "optax_lamb":
        opt = optax.lamb(LR, weight_decay=WEIGHT_DECAY)
    elif impl == "optax_lars":
        opt = optax.lars(LR, weight_decay=WEIGHT_DECAY, momentum=0.9)
    else:
        raise ValueError(impl)

    params = jnp.asarray(_random_f32(n, 0))
    grads = jnp.asarray(_random_f32(n, 1))
    state = opt.init(params)

    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # params and state are donated (updated in place); grads are reused.
    step = jax.jit(step, donate_argnums=(0, 1))
    jax.block_until_ready((params, state, grads))

    times = []
    for i in range(WARMUP + reps):
        t0 = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        t1 = time.perf_counter()
        if i >= WARMUP:
            times.append(t1 - t0)
    if not bool(jnp.isfinite(params).all()):
        raise RuntimeError("non-finite parameters after the timed steps")
    return times, f"jax {jax.__version__} optax {optax.__version__}"


def run_child(impl, n, reps, threads):
    """Runs inside the child process; prints one JSON line on stdout."""
    _pin(threads)
    try:
        if impl.startswith("torch_"):
            times, version = bench_torch(impl, n, reps, threads)
        else:
            times, version = bench_optax(impl, n, reps, threads)
    except Exception as e:  # report and let the parent carry on
        print(json.dumps({"impl": impl, "params": n, "error": f"{type(e).__name__}: {e}"}))
        return 1
    med_ms, min_ms = _summary(times)
    bpp = BYTES_PER_PARAM[impl]
    print(
        json.dumps(
            {
                "impl": impl,
                "params": n,
                "ms_per_step": round(med_ms, 4),
                "min_ms": round(min_ms, 4),
                "bytes_per_param": bpp,
                "gb_per_s": round(bpp * n / (med_ms / 1e3) / 1e9, 3),
                "threads": threads,
                "reps": reps,
                "warmup": WARMUP,
                "version": version,
            }
        )
    )
    return 0


def run_parent(args):
    results = []
    for impl in args.which:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--_child",
            impl,
            "--params",
            str(args.params),
            "--reps",
            str(args.reps),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(
            cmd, env=_thread_env(args.threads), capture_output=True, text=True
        )
        line = next(
            (l for l in reversed(proc.stdout.splitlines()) if l.startswith("{")), None
        )
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rec = {"impl": impl, "params": args.params,
                   "error": f"child exited {proc.returncode}: {tail[0]}"}
        else:
            rec = json.loads(line)
        results.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)

    if not args.json:
        hdr = f"{'impl':<22}{'params':>12}{'median ms':>12}{'min ms':>10}{'B/param':>9}{'GB/s':>9}"
        print(f"threads={args.threads} reps={args.reps} warmup={WARMUP}")
        print(hdr)
        print("-" * len(hdr))
        for r in results:
            if "error" in r:
                print(f"{r['impl']:<22}  ERROR {r['error']}")
            else:
                print(
                    f"{r['impl']:<22}{r['params']:>12}{r['ms_per_step']:>12.3f}"
                    f"{r['min_ms']:>10.3f}{r['bytes_per_param']:>9}{r['gb_per_s']:>9.2f}"
                )
        versions = sorted({r["version"] for r in results if "version" in r})
        if versions:
            print("versions: " + "; ".join(versions))
    return 1 if any("error" in r for r in results) else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=10_000_000, help="number of float32 parameters")
    ap.add_argument("--reps", type=int, default=20, help=f"timed steps (after {WARMUP} warm-up steps)")
    ap.add_argument("--threads", type=int, default=2, help="threads per implementation")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--which", nargs="+", default=ALL_IMPLS, metavar="IMPL",
                    help="implementations to run (space- or comma-separated): " + ", ".join(ALL_IMPLS))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.params < 1 or args.reps < 1 or args.threads < 1:
        ap.error("--params, --reps and --threads must be positive")
    args.which = [w for item in args.which for w in item.split(",") if w]
    bad = [w for w in args.which if w not in ALL_IMPLS]
    if bad:
        ap.error(f"unknown --which {bad}; choose from {ALL_IMPLS}")
    if args._child:
        return run_child(args._child, args.params, args.reps, args.threads)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
