"""Benchmark: TopK-family training steps through a dense f vs through the chosen latents only
(`sparse_decode`), same SAE, same batches.

    python benchmarks/topk_sparse.py                                  # topk, 512 -> 16384, k 32, batch 4096
    python benchmarks/topk_sparse.py --arch batchtopk --steps 3

Prints, in one run: tokens/s of each path (float32, after warm-up steps), for the whole
`train_step_` (which includes the optimizer and the trainer's metrics, `_measure`, dense over
[batch, d_sae]) and for the SAE's training_forward + backward alone, and the ratios.
"""
from __future__ import annotations

import argparse
import time

import torch

from shared.saes.base import SAEConfig, StepContext
from shared.saes.batchtopk import BatchTopKSAE
from shared.saes.matryoshka import MatryoshkaBatchTopKSAE
from shared.saes.topk import TopKSAE
from train.step import make_optimizer, train_step_

ARCHS = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka_batchtopk": MatryoshkaBatchTopKSAE}


def tokens_per_s(arch: str, sparse: bool, d_in: int, d_sae: int, k: int, batch: int, warmup: int,
                 steps: int, device: torch.device, dead_frac: float) -> tuple[float, float]:
    """(tokens/s of `train_step_`, tokens/s of the SAE's own training_forward + backward), each
    timed over `steps` steps after `warmup` steps."""
    torch.manual_seed(0)
    cls = ARCHS[arch]
    sae = cls(SAEConfig(d_in, d_sae), cls.Settings(k=k, sparse_decode=sparse), device=device)
    opt = make_optimizer(sae, 1e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    dead = None
    if dead_frac > 0:
        dead = torch.rand(d_sae, generator=gen, device=device) < dead_frac
    context = StepContext(dead_mask=dead)
    batches = [torch.randn(batch, d_in, generator=gen, device=device) for _ in range(2)]

    def full(i: int) -> None:
        train_step_(sae, opt, None, batches[i % 2], context)

    def compute(i: int) -> None:
        sae.training_forward(batches[i % 2], context).loss.backward()
        opt.zero_grad(set_to_none=True)

    rates = []
    for fn in (full, compute):
        for i in range(warmup):
            fn(i)
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            fn(i)
        sync(device)
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates[0], rates[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="topk")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dead-frac", type=float, default=0.0,
                   help="fraction of latents passed as dead (adds the AuxK term; 0: dead_mask None)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"{a.arch}: d_in {a.d_in}, d_sae {a.d_sae}, k {a.k}, batch {a.batch}, float32, {device}, "
          f"{torch.get_num_threads()} threads, dead fraction {a.dead_frac}")
    rates = {}
    for sparse in (False, True):
        rates[sparse] = tokens_per_s(a.arch, sparse, a.d_in, a.d_sae, a.k, a.batch, a.warmup, a.steps,
                                     device, a.dead_frac)
        print(f"  {'sparse' if sparse else 'dense '}: train_step_ {rates[sparse][0]:9.0f} tokens/s"
              f"   (training_forward + backward alone: {rates[sparse][1]:9.0f} tokens/s)")
    print(f"  sparse / dense: train_step_ {rates[True][0] / rates[False][0]:.2f}x, "
          f"forward + backward {rates[True][1] / rates[False][1]:.2f}x")

if __name__ == "__main__":
    main()
