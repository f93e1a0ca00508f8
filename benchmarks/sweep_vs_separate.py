"""Benchmark: wall time of an N-SAE sweep (one read of the dump, lockstep) vs N separate runs.

    python benchmarks/sweep_vs_separate.py              # 4 SAEs, d_in 512 -> 2048, 40 steps each
    python benchmarks/sweep_vs_separate.py --n 8 --d-sae 4096

Both sides train the same SAEs on the same synthetic dump with the same seed (and end with the
same weights); the difference is reading/shuffling once and sharing batches.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shared.dump_writer import write_dump
from train.config import LanguageModelSAERunnerConfig
from train.run import train
from train.sweep import train_sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4, help="SAEs (l1 coefficients) in the sweep")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    rows = args.batch_size * args.steps
    l1s = [0.3 * 2**i for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dump(tmp / "dump", torch.randn(rows, args.d_in), context_size=128, shard_rows=1 << 18)
        base = dict(shards=str(tmp / "dump"), d_sae=args.d_sae, train_batch_size=args.batch_size,
                    device=args.device, eval_holdout_contexts=0, feature_sampling_method="none",
                    b_dec_init_method="mean", wandb_log_frequency=10)
        start = time.perf_counter()
        for i, l1 in enumerate(l1s):
            cfg = LanguageModelSAERunnerConfig(**base, l1_coefficient=l1, checkpoint_path=str(tmp / f"solo{i}"))
            train(cfg, log=lambda s: None, progress=False, verify=False)
        separate = time.perf_counter() - start
        start = time.perf_counter()
        cfg = LanguageModelSAERunnerConfig(**base, checkpoint_path=str(tmp / "sweep"))
        train_sweep(cfg, {"l1_coefficient": l1s}, log=lambda s: None, progress=False, verify=False)
        sweep = time.perf_counter() - start
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{args.n} SAEs {args.d_in} -> {args.d_sae}, batch {args.batch_size}, {args.steps} steps each, "
          f"device {device}")
    print(f"{args.n} separate runs : {separate:8.1f} s")
    print(f"one {args.n}-SAE sweep  : {sweep:8.1f} s   ({separate / sweep:.2f}x faster)")


if __name__ == "__main__":
    main()
