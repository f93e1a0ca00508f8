"""Benchmark: SAE training from a dump vs the same steps on batches already in RAM, and how well
the loader mixes contexts compared with a sliding buffer fed in dump order (what peers do).

    python benchmarks/train_throughput.py                       # d_in 512 -> d_sae 4096, batch 4096
    python benchmarks/train_throughput.py --d-sae 16384 --steps 20

Prints, in one run: tokens/s both ways and their ratio (target >= 0.95: the loader costs < 5%),
and distinct contexts per 4096-row batch for our loader and for a sliding buffer.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.dump_writer import write_dump
from shared.reader import open_dump
from shared.sae import SAEConfig, SparseAutoencoder
from train.loader import ActivationLoader
from train.step import make_optimizer, train_step_


def time_steps(batches, d_in: int, d_sae: int, steps: int, device: torch.device, autocast: bool) -> float:
    """tokens/s of `steps` SAE steps fed from `batches` (after 2 warm-up steps)."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in, d_sae), device=device)
    opt = make_optimizer(sae, 1e-4)
    it = iter(batches)
    for _ in range(2):
        train_step_(sae, opt, None, next(it), autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, rows = time.perf_counter(), 0
    for _ in range(steps):
        x = next(it)
        train_step_(sae, opt, None, x, autocast=autocast)
        rows += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows / (time.perf_counter() - start)


def sliding_buffer_contexts(n_rows: int, ctx: int, batch: int, buffer_rows: int, seed: int = 0) -> float:
    """Distinct contexts per batch from a buffer refilled in dump order and shuffled, emitting
    half of it per refill (the mixing-buffer scheme of on-the-fly activation stores)."""
    rng = np.random.default_rng(seed)
    buf = np.arange(buffer_rows)
    nxt = buffer_rows
    counts = []
    for _ in range(8):
        rng.shuffle(buf)
        half = buffer_rows // 2
        out, buf = buf[:half], buf[half:]
        for j in range(0, half - batch + 1, batch):
            counts.append(len(np.unique(out[j : j + batch] // ctx)))
        refill = np.arange(nxt, min(nxt + half, n_rows))
        nxt += len(refill)
        buf = np.concatenate([buf, refill])
    return float(np.mean(counts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rows", type=int, default=1 << 20, help="rows in the synthetic dump")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--id-rows", type=int, default=1 << 24, help="rows of the context-mixing dump")
    p.add_argument("--device", default=None)
    p.add_argument("--autocast", action="store_true", help="bfloat16 autocast")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with tempfile.TemporaryDirectory() as tmp:
        acts = torch.randn(args.rows, args.d_in)
        write_dump(Path(tmp) / "d", acts, context_size=args.context_size, shard_rows=1 << 18)
        dump = open_dump(Path(tmp) / "d")
        in_ram = [acts[i * args.batch_size : (i + 1) * args.batch_size].to(device)
                  for i in range(args.rows // args.batch_size)]
        ram = time_steps(itertools.cycle(in_ram), args.d_in, args.d_sae, args.steps, device, args.autocast)
        del in_ram
        loader = ActivationLoader(dump, args.batch_size, seed=0, device=device)
        batches = loader.batches()
        disk = time_steps(batches, args.d_in, args.d_sae, args.steps, device, args.autocast)
        batches.close()

        # Distinct contexts per batch: row r of this dump holds context r // context_size.
        # A 16M-token dump of row ids, shuffled with the buffer a d_in-wide dump would get.
        ids = torch.arange(args.id_rows, dtype=torch.float64).float()[:, None]
        write_dump(Path(tmp) / "ids", ids, context_size=args.context_size, shard_rows=1 << 20)
        id_loader = ActivationLoader(open_dump(Path(tmp) / "ids"), args.batch_size, seed=0,
                                     buffer_rows=default_buffer(args.d_in, args.batch_size))
        ours = np.mean([len(np.unique(b[:, 0].long().numpy() // args.context_size))
                        for b in itertools.islice(id_loader.batches(), 8)])
    peer = sliding_buffer_contexts(args.id_rows, args.context_size, args.batch_size,
                                   buffer_rows=24 * 32 * args.context_size)  # seed: 24 x 32 contexts
    print(f"SAE {args.d_in} -> {args.d_sae}, batch {args.batch_size}, {args.steps} steps, device {device}"
          f"{', bf16 autocast' if args.autocast else ''}; dump of {args.rows:,} rows")
    print(f"steps on batches in RAM : {ram:10,.0f} tokens/s")
    print(f"steps from the dump     : {disk:10,.0f} tokens/s")
    print(f"ratio dump / RAM        : {disk / ram:.3f}   (target >= 0.95)")
    print(f"distinct contexts per {args.batch_size}-row batch: loader {ours:,.0f}; "
          f"sliding buffer in dump order {peer:,.0f}  ({args.id_rows:,}-row dump)")


def default_buffer(d_in: int, batch: int) -> int:
    from train.loader import default_buffer_rows

    return default_buffer_rows(d_in, batch)


if __name__ == "__main__":
    main()
