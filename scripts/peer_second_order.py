#!/usr/bin/env python3
"""Peer benchmark for `keel bench --model gpt-small`: DistributedShampoo,
torch.optim.Muon and torch's fused AdamW on the gpt-small parameter shapes.

Shapes: a 6-layer, 384-wide GPT-2 with vocabulary 65 and context 256 (the
same 76 tensors, 10.8M parameters, as keel's `BenchModel::GptSmall`), float32,
fixed pseudo-random gradients. Each optimizer runs in its own child process
with torch.set_num_threads(--threads).

  adamw            torch.optim.AdamW(lr=1e-3, fused=True), all tensors
  shampoo_fN       DistributedShampoo(lr=1e-3, max_preconditioner_dim=1024,
                   precondition_frequency=N, grafting_config=
                   AdamPreconditionerConfig()), all tensors; other settings
                   default (betas (0.9, 1.0), epsilon 1e-12)
  muon_f32         torch.optim.Muon(lr=1e-3) on the hidden matrices (its
                   Newton-Schulz patched to run in float32 instead of
                   bfloat16), AdamW(fused) on the rest
  muon_bf16        the same with torch's default bfloat16 Newton-Schulz

The time per step is the mean over `steps` consecutive steps (a multiple of
the precondition frequency, after preconditioning started), i.e. amortized.

Set-up (outside the repository): the venv of scripts/peer_bench.py, plus the
DistributedShampoo sources on PYTHONPATH:

    # facebookresearch/optimizers checked out at /work/peers/optimizers
    PYTHONPATH=/work/peers/optimizers /work/peers/venv/bin/python \
        scripts/peer_second_order.py --threads 2 --which adamw,shampoo_f1,shampoo_f10,shampoo_f100,muon_f32
"""

import argparse
import json
import multiprocessing as mp
import time


def gpt_small_shapes():
    vocab, context, layers, c = 65, 256, 6, 384
    shapes = [("transformer.wte.weight", (vocab, c)), ("transformer.wpe.weight", (context, c))]
    for l in range(layers):
        h = f"transformer.h.{l}."
        shapes += [
            (h + "ln_1.weight", (c,)),
            (h + "ln_1.bias", (c,)),
            (h + "attn.c_attn.weight", (3 * c, c)),
            (h + "attn.c_attn.bias", (3 * c,)),
            (h + "attn.c_proj.weight", (c, c)),
            (h + "attn.c_proj.bias", (c,)),
            (h + "ln_2.weight", (c,)),
            (h + "ln_2.bias", (c,)),
            (h + "mlp.c_fc.weight", (4 * c, c)),
            (h + "mlp.c_fc.bias", (4 * c,)),
            (h + "mlp.c_proj.weight", (c, 4 * c)),
            (h + "mlp.c_proj.bias", (c,)),
        ]
    shapes += [("transformer.ln_f.weight", (c,)), ("transformer.ln_f.bias", (c,))]
    return shapes


def is_hidden_matrix(name, shape):
    return len(shape) == 2 and ".wte." not in name and ".wpe." not in name


def child(which, threads, steps, queue):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = gpt_small_shapes()
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for _, s in shapes]
    grads = [torch.randn(s) * 0.01 for _, s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()

    frequency, start = 1, 1
    optimizers = []
    if which == "adamw":
        optimizers.append(torch.optim.AdamW(params, lr=1e-3, fused=True))
    elif which.startswith("shampoo_f"):
        from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo

        frequency = int(which[len("shampoo_f"):])
        start = frequency
        optimizers.append(
            DistributedShampoo(
                params,
                lr=1e-3,
                max_preconditioner_dim=1024,
                precondition_frequency=frequency,
                grafting_config=AdamPreconditionerConfig(),
            )
        )
    elif which.startswith("muon_"):
        import torch.optim._muon as muon_module

        if which == "muon_f32":
            # torch casts the update to bfloat16 for Newton-Schulz; run the
            # same iteration (same operations) in float32 instead.
            def zeropower_f32(grad, ns_coefficients, ns_steps, eps):
                a, b, c = ns_coefficients
                x = grad.to(torch.float32, copy=True)
                if grad.size(0) > grad.size(1):
                    x = x.T
                x = x / x.norm().clamp(min=eps)
                for _ in range(ns_steps):
                    gram = x @ x.T
                    poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
                    x = torch.addmm(x, poly, x, beta=a)
                if grad.size(0) > grad.size(1):
                    x = x.T
                return x

            muon_module._zeropower_via_newtonschulz = zeropower_f32
        hidden = [p for (n, s), p in zip(shapes, params) if is_hidden_matrix(n, s)]
        rest = [p for (n, s), p in zip(shapes, params) if not is_hidden_matrix(n, s)]
        optimizers.append(torch.optim.Muon(hidden, lr=1e-3))
        optimizers.append(torch.optim.AdamW(rest, lr=1e-3, fused=True))
    else:
        raise SystemExit(f"unknown implementation {which}")

    def step():
        for opt in optimizers:
            opt.step()

    t = 0
    while t + 1 < start:
        step()
        t += 1
    steps = -(-steps // frequency) * frequency
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    queue.put({"impl": which, "threads": threads, "steps": steps, "ms_per_step": ms})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", default="adamw,shampoo_f1,shampoo_f10,shampoo_f100,muon_f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="minimum timed steps (rounded up to the frequency)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    for which in args.which.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(which, args.threads, args.steps, queue))
        proc.start()
        result = queue.get()
        proc.join()
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{which:14s} {result['ms_per_step']:10.1f} ms/step  ({result['steps']} steps, {args.threads} threads)")


if __name__ == "__main__":
    main()
