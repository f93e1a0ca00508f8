"""Benchmark: every architecture's training step against `standard` at the same size, and the
standard step's achieved matmul rate against bare matmuls of the same shapes.

    python benchmarks/architectures_speed.py                       # 512 -> 16384, k 32, batch 4096
    python benchmarks/architectures_speed.py --d-sae 8192 --steps 3

Prints, in one run:
  1. tokens/s of `train_step_` (forward, backward, constraints, fused Adam, metrics) for each
     architecture, and its ratio to `standard` (the TopK family without and with AuxK at work);
  2. for `standard` at 512 -> 8192 (the shape the issue quotes), the step's matmul FLOP/s (12 x
     batch x d_in x d_sae per step: encoder and decoder forward, their weight gradients, and the
     gradients through f and through x - b_dec) against the same six matmuls timed bare, in
     float32 and in bfloat16 under autocast.
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from shared.saes import ARCHITECTURES, SAEConfig, StepContext
from train.step import make_optimizer, train_step_

SETTINGS = {"topk": dict(k=32), "batchtopk": dict(k=32), "matryoshka_batchtopk": dict(k=32)}


def timed(fn, warmup: int, steps: int) -> float:
    """Seconds per call of fn(i), after warm-up calls."""
    for i in range(warmup):
        fn(i)
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    return (time.perf_counter() - start) / steps


def step_seconds(arch: str, d_in: int, d_sae: int, batch: int, warmup: int, steps: int,
                 autocast: bool = False, auxk: bool = False) -> float:
    """Seconds per `train_step_`. The TopK family runs without AuxK unless `auxk` (the trainer
    passes no dead mask while no feature is dead); with `auxk`, 1% of the features are dead."""
    torch.manual_seed(0)
    cls = ARCHITECTURES[arch]
    sae = cls(SAEConfig(d_in, d_sae), cls.Settings(**SETTINGS.get(arch, {})))
    opt = make_optimizer(sae, 1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, d_in, generator=g) for _ in range(2)]
    dead = (torch.arange(d_sae) % 100 == 0) if auxk else None
    return timed(lambda i: train_step_(sae, opt, None, batches[i % 2], StepContext(dead_mask=dead),
                                       autocast=autocast), warmup, steps)


def bare_matmul_seconds(d_in: int, d_sae: int, batch: int, warmup: int, steps: int, autocast: bool) -> float:
    """The six matmuls of a dense SAE step, and nothing else."""
    g = torch.Generator().manual_seed(2)
    x, W_enc = torch.randn(batch, d_in, generator=g), torch.randn(d_in, d_sae, generator=g)
    W_dec, dh = torch.randn(d_sae, d_in, generator=g), torch.randn(batch, d_sae, generator=g)
    dx = torch.randn(batch, d_in, generator=g)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()

    def six(i: int) -> None:
        with amp:
            h = x @ W_enc  # encoder forward [batch, d_sae]
            h @ W_dec  # decoder forward [batch, d_in]
            h.T @ dx  # dW_dec
            dx @ W_dec.T  # gradient through f
            x.T @ dh  # dW_enc
            dh @ W_enc.T  # gradient through x - b_dec (b_dec's)

    return timed(six, warmup, steps)


def fast_bf16() -> bool:
    """Whether a bf16 matmul beats fp32 here (CPUs without AVX512-BF16/AMX emulate it, ~80x slower)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    fp32 = timed(lambda i: a @ b, 2, 5)
    bf16 = timed(lambda i: a.bfloat16() @ b.bfloat16(), 2, 5)
    print(f"  bare 512x512 matmul: fp32 {2 * 512**3 / fp32 / 1e9:.1f} GFLOP/s, bf16 {2 * 512**3 / bf16 / 1e9:.1f} GFLOP/s")
    return bf16 < fp32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--flops-d-sae", type=int, default=8192)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.d_in} -> {a.d_sae}, batch {a.batch}")
    base = None
    for arch in ARCHITECTURES:
        seconds = step_seconds(arch, a.d_in, a.d_sae, a.batch, a.warmup, a.steps)
        base = base or seconds
        print(f"  {arch:<22} {a.batch / seconds:>9,.0f} tok/s   x{base / seconds:.2f} of standard")
        if ARCHITECTURES[arch].dead_feature_policy == "auxk":
            seconds = step_seconds(arch, a.d_in, a.d_sae, a.batch, a.warmup, a.steps, auxk=True)
            print(f"  {arch + ' + AuxK':<22} {a.batch / seconds:>9,.0f} tok/s   x{base / seconds:.2f} of standard"
                  "   (1% of features dead)")
    flops = 12 * a.batch * a.d_in * a.flops_d_sae
    print(f"standard step vs bare matmuls at {a.d_in} -> {a.flops_d_sae}, batch {a.batch} "
          f"({flops / 1e9:.0f} GFLOP per step):")
    for autocast in (False, True):
        name = "bf16 autocast" if autocast else "fp32"
        if autocast and not fast_bf16():
            print(f"  {name:<14} skipped: bf16 matmuls are slower than fp32 on this CPU (no native bf16)")
            continue
        step = step_seconds("standard", a.d_in, a.flops_d_sae, a.batch, a.warmup, a.steps, autocast)
        bare = bare_matmul_seconds(a.d_in, a.flops_d_sae, a.batch, a.warmup, a.steps, autocast)
        print(f"  {name:<14} step {flops / step / 1e9:6.1f} GFLOP/s   bare {flops / bare / 1e9:6.1f} GFLOP/s"
              f"   step / bare {bare / step:.2f}")


if __name__ == "__main__":
    main()
