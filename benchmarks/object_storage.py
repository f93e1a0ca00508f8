"""Benchmark: a dump read from object storage (a local moto S3 server) vs the same rows on local
disk (memory-mapped safetensors, the default), at the quickstart's shape (d_in 576, 128 rows per
context) and SAE size (576 -> 2304, batch 1024).

    python benchmarks/object_storage.py                  # 3,200 contexts (944 MB float32)
    python benchmarks/object_storage.py --contexts 1600 --steps 80

Prints side by side: loader-only read tokens/s, distinct contexts per 4096-row batch, and SAE
training tokens/s (steps fed by the loader, after warm-up; the prefetcher fetches the next epoch
while they run), with the ratios bucket / disk (targets: contexts >= 3,000, training >= 0.9).
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared import storage
from shared.dump_writer import write_dump
from shared.reader import open_dump
from shared.sae import SAEConfig, SparseAutoencoder
from train.loader import ActivationLoader
from train.step import make_optimizer, train_step_

D_IN, CTX = 576, 128


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto server did not start")


def batch_contexts(loader: ActivationLoader, n_batches: int) -> float:
    """Mean distinct contexts per batch over the first batches, from the loader's own plan."""
    plan = loader.plan(0)
    rows = loader._buffer_rows_index(plan, 0)
    perm = loader._permutation(0, 0, len(rows), rows)
    bs = loader.batch_size
    counts = [len(np.unique(rows[perm[j * bs : (j + 1) * bs]] // CTX)) for j in range(n_batches)
              if (j + 1) * bs <= len(rows)]
    return float(np.mean(counts))


def read_rate(dump, batches: int) -> tuple[float, float]:
    """(tokens/s reading `batches` 4096-row batches, first buffer included; distinct contexts)."""
    loader = ActivationLoader(dump, batch_size=4096, seed=0)
    start = time.perf_counter()
    rows = sum(len(b) for b in itertools.islice(loader.batches(), batches))
    return rows / (time.perf_counter() - start), batch_contexts(loader, 20)


def train_rate(dump, steps: int, d_sae: int, batch: int) -> float:
    """tokens/s of SAE steps fed by the loader (after warm-up steps that fill the first buffer)."""
    torch.manual_seed(0)
    loader = ActivationLoader(dump, batch_size=batch, seed=0)
    sae = SparseAutoencoder(SAEConfig(D_IN, d_sae), device=torch.device("cpu"))
    opt = make_optimizer(sae, 1e-3)
    it = loader.batches()
    for _ in range(3):
        train_step_(sae, opt, None, next(it))
    start, rows = time.perf_counter(), 0
    for _ in range(steps):
        x = next(it)
        train_step_(sae, opt, None, x)
        rows += len(x)
    rate = rows / (time.perf_counter() - start)
    it.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, default=3200, help="Contexts of 128 rows in the dump.")
    ap.add_argument("--steps", type=int, default=150, help="Timed SAE steps per source.")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()

    proc, url = start_moto()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL_S3=url)
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
        n = args.contexts * CTX
        acts = torch.from_numpy(np.random.default_rng(0).standard_normal((n, D_IN), dtype=np.float32))
        shard_rows = 64 * 1024  # about 150 MB shards
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "dump"
            t = time.perf_counter()
            write_dump(local, acts, context_size=CTX, shard_rows=shard_rows)
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            write_dump("s3://bench/dump", acts, context_size=CTX, shard_rows=shard_rows, fmt="zarr")
            t_remote = time.perf_counter() - t
            del acts
            mb = n * D_IN * 4 / 1e6
            print(f"dump: {args.contexts:,} contexts x {CTX} rows x d_in {D_IN} float32 = {mb:,.0f} MB; "
                  f"write {mb / t_local:,.0f} MB/s to disk, {mb / t_remote:,.0f} MB/s to the bucket", flush=True)
            disk, bucket = open_dump(local), open_dump("s3://bench/dump")
            t = time.perf_counter()
            bucket.verify()
            t_verify = time.perf_counter() - t
            print(f"verify (every checksum) from the bucket: {t_verify:.1f} s ({mb / t_verify:,.0f} MB/s)", flush=True)
            batches = -(-n // 4096)
            r_disk, c_disk = read_rate(disk, batches)
            r_bucket, c_bucket = read_rate(bucket, batches)
            t_disk = train_rate(disk, args.steps, args.d_sae, args.batch)
            t_bucket = train_rate(bucket, args.steps, args.d_sae, args.batch)
        print(f"\n{'':44s}{'disk':>12s}{'bucket':>12s}{'ratio':>8s}")
        print(f"{'read tokens/s (loader only, one epoch)':44s}{r_disk:12,.0f}{r_bucket:12,.0f}{r_bucket / r_disk:8.2f}")
        print(f"{'distinct contexts per 4096-row batch':44s}{c_disk:12,.0f}{c_bucket:12,.0f}{c_bucket / c_disk:8.2f}")
        print(f"{f'training tokens/s ({D_IN}->{args.d_sae}, batch {args.batch})':44s}{t_disk:12,.0f}"
              f"{t_bucket:12,.0f}{t_bucket / t_disk:8.2f}")
    finally:
        storage.reset_stores()
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
