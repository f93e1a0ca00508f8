"""Benchmark: transcoders against SAEs of the same shape, and a sweep of N transcoders against N
separate runs.

    python benchmarks/transcoders.py                 # both parts, sized for 2 CPU cores
    python benchmarks/transcoders.py --part step --d-out 512 --d-sae 16384 --batch 4096
    python benchmarks/transcoders.py --part sweep --n 8
    python benchmarks/transcoders.py --part step --threads 1 --steps 8   # BENCHMARKS.md's, on a loaded machine

Prints, in one run:
  1. (`step`) tokens/s of `train_step_` (forward, backward, constraints, fused Adam, metrics) for
     each architecture as an SAE, as a transcoder and as a skip transcoder, at two shapes:
     d_in = d_out (e.g. resid_mid -> mlp_out) and d_in = 4 d_out (the MLP's hidden activations ->
     its output). The transcoder's ratio is to the SAE that reads the same input (d_in -> d_sae
     -> d_in); at d_in = 4 d_out the SAE on the output's width (d_out -> d_sae -> d_out) is shown
     too. A transcoder's encoder reads x itself, not x - b_dec, so it has no gradient through its
     input: at d_in = d_out it runs 5 of the SAE's 6 matmuls' worth of backward work.
  2. (`sweep`) wall time of N standard transcoders differing only in `l1_coefficient`, trained on
     an input dump and a target dump (synthetic, of one "pass") one after another (`train` N
     times: both dumps read N times) and in lockstep (`train_sweep`: read once, batches shared).
     Both sides end with the same weights (tests/test_transcoders.py checks this).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shared.dump_writer import write_dump
from shared.saes import ARCHITECTURES, SAEConfig, StepContext
from train.batch import Batch
from train.config import LanguageModelSAERunnerConfig
from train.run import train
from train.step import make_optimizer, train_step_
from train.sweep import train_sweep

SETTINGS = {"topk": dict(k=32), "batchtopk": dict(k=32), "matryoshka_batchtopk": dict(k=32)}


def stepper(arch: str, d_in: int, d_sae: int, d_out: int | None, batch: int, skip: bool = False):
    """One `train_step_` per call of an SAE (d_out None: d_in -> d_sae -> d_in) or a transcoder
    (d_in -> d_sae -> d_out, with a skip path when `skip`), alternating two batches. The TopK
    family runs without AuxK (the trainer passes no dead mask while no feature is dead)."""
    torch.manual_seed(0)
    cls = ARCHITECTURES[arch]
    settings = cls.Settings(**SETTINGS.get(arch, {}), skip_connection=skip)
    cfg = SAEConfig(d_in, d_sae) if d_out is None else SAEConfig(d_in, d_sae, d_out, apply_b_dec_to_input=False)
    sae = cls(cfg, settings)
    opt = make_optimizer(sae, 1e-4)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, d_in, generator=g) for _ in range(2)]
    batches = xs if d_out is None else [Batch(x, torch.randn(batch, d_out, generator=g)) for x in xs]
    count = iter(range(1 << 30))
    return lambda: train_step_(sae, opt, None, batches[next(count) % 2], StepContext())


def best_seconds(steppers: list, warmup: int, steps: int) -> list[float]:
    """Seconds of each stepper's fastest step, the steppers taking turns step by step (so that
    another tenant's load on a shared machine falls on all of them alike, and the minimum drops it)."""
    for step in steppers:
        for _ in range(warmup):
            step()
    best = [float("inf")] * len(steppers)
    for _ in range(steps):
        for i, step in enumerate(steppers):
            start = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def step_part(a: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; train_step_ tokens/s (best of {a.steps} "
          f"steps, taking turns), d_sae {a.d_sae}, batch {a.batch}, k 32 for the TopK family")
    for d_in in (a.d_out, 4 * a.d_out):
        tok = lambda seconds: a.batch / seconds  # noqa: E731
        extra = "" if d_in == a.d_out else f" {f'SAE {a.d_out}->{a.d_out}':>15}"
        print(f"{f'{d_in} -> {a.d_out}':<14}{'architecture':<22} {f'SAE {d_in}->{d_in}':>14} {'transcoder':>15} "
              f"{'skip transcoder':>19}{extra}")
        for arch in ARCHITECTURES:
            steppers = [stepper(arch, d_in, a.d_sae, None, a.batch), stepper(arch, d_in, a.d_sae, a.d_out, a.batch),
                        stepper(arch, d_in, a.d_sae, a.d_out, a.batch, skip=True)]
            if d_in != a.d_out:
                steppers.append(stepper(arch, a.d_out, a.d_sae, None, a.batch))
            sae, tc, skip, *narrow = best_seconds(steppers, a.warmup, a.steps)
            line = (f"{'':<14}{arch:<22} {tok(sae):>14,.0f} {tok(tc):>9,.0f} x{sae / tc:4.2f}"
                    f" {tok(skip):>13,.0f} x{sae / skip:4.2f}")
            if narrow:
                line += f" {tok(narrow[0]):>15,.0f}"
            print(line, flush=True)


def sweep_part(a: argparse.Namespace) -> None:
    d_in, d_out = 4 * a.d_out, a.d_out
    rows = a.sweep_batch * a.sweep_steps
    l1s = [0.3 * 2**i for i in range(a.n)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, d_in, generator=g)
        # The target: a linear map of the input plus noise, as an MLP's output is a map of its hidden.
        t = x @ (torch.randn(d_in, d_out, generator=g) / d_in**0.5) + 0.1 * torch.randn(rows, d_out, generator=g)
        write_dump(tmp / "in", x, context_size=128, shard_rows=1 << 18, hook="blocks.0.mlp.hook_post")
        write_dump(tmp / "out", t, context_size=128, shard_rows=1 << 18, hook="blocks.0.hook_mlp_out")
        del x, t
        base = dict(shards=str(tmp / "in"), target_shards=str(tmp / "out"), d_sae=a.sweep_d_sae,
                    train_batch_size=a.sweep_batch, device=a.device, eval_holdout_contexts=0,
                    feature_sampling_method="none", b_dec_init_method="mean", wandb_log_frequency=10)
        start = time.perf_counter()
        for i, l1 in enumerate(l1s):
            cfg = LanguageModelSAERunnerConfig(**base, l1_coefficient=l1, checkpoint_path=str(tmp / f"solo{i}"))
            train(cfg, log=lambda s: None, progress=False, verify=False)
        separate = time.perf_counter() - start
        start = time.perf_counter()
        cfg = LanguageModelSAERunnerConfig(**base, checkpoint_path=str(tmp / "sweep"))
        train_sweep(cfg, {"l1_coefficient": l1s}, log=lambda s: None, progress=False, verify=False)
        sweep = time.perf_counter() - start
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{a.n} transcoders {d_in} -> {a.sweep_d_sae} -> {d_out}, batch {a.sweep_batch}, {a.sweep_steps} steps "
          f"each, device {device}")
    print(f"{a.n} separate runs        : {separate:8.1f} s")
    print(f"one {a.n}-transcoder sweep : {sweep:8.1f} s   ({separate / sweep:.2f}x faster)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("step", "sweep", "both"), default="both")
    p.add_argument("--d-out", type=int, default=256, help="the target's width; the inputs are d_out and 4 d_out")
    p.add_argument("--d-sae", type=int, default=2048, help="(step)")
    p.add_argument("--batch", type=int, default=1024, help="(step)")
    p.add_argument("--warmup", type=int, default=1, help="(step)")
    p.add_argument("--steps", type=int, default=5, help="(step) timed steps per figure (the best is shown)")
    p.add_argument("--n", type=int, default=4, help="(sweep) transcoders (l1 coefficients)")
    p.add_argument("--sweep-d-sae", type=int, default=1024)
    p.add_argument("--sweep-batch", type=int, default=2048)
    p.add_argument("--sweep-steps", type=int, default=20)
    p.add_argument("--device", default=None, help="(sweep)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads [torch's default]; 1 steadies the figures on a loaded machine")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.part in ("step", "both"):
        step_part(a)
    if a.part in ("sweep", "both"):
        sweep_part(a)


if __name__ == "__main__":
    main()
