"""A well-shuffled, memory-mapped, prefetching stream of activation batches from a dump.

Shuffling in two levels keeps disk reads sequential-ish and batches well mixed:
1. per epoch, the dump's rows are cut into small contiguous blocks (`block_rows`) whose order is
   permuted; consecutive runs of blocks fill an in-RAM buffer (`buffer_rows`), gathered in file
   order from the memory-mapped shards;
2. each buffer is permuted row by row and cut into batches.
A 4096-row batch then holds rows from thousands of blocks spread over the whole dump, so nearly
every row comes from a different context (a sliding buffer fed in dump order gives a few hundred).

The order is a pure function of (seed, epoch): every epoch visits every row exactly once, and a
run resumed at global batch k yields exactly the batches k, k+1, ... of an uninterrupted run.

A dump in object storage is read in whole chunks instead (`whole_chunks`): the blocks are the
shards' chunks (thousands of rows, one request each, many requests in flight), and each buffer is
ordered so that a batch takes at most one row per context until every context of the buffer has
given one (a random row of each, in random order), so a 4096-row batch still comes from as many
contexts as the buffer holds (about 3,600 at d_in 576 with the default 1 GiB buffer). Setting
MATS_SAE_READ=chunks reads a local dump the same way (the same batches as from the bucket), and
MATS_SAE_CHUNK_CACHE=FOLDER keeps the fetched chunks on local disk for later epochs, runs and sweeps
(each checked against its sha256 when read back).

`AlignedLoader` reads several dumps of one harvest pass (a transcoder's input and target hooks)
in one order: each batch is the same rows of every dump.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from shared.background import background
from shared.reader import Dump
from shared.shard_files import remote_chunk_rows, stored_to_float32
from train.same_pass import check_same_pass

BUFFER_BYTES = 1 << 30  # default shuffle buffer: about 1 GiB of float32 rows
READ_ENV = "MATS_SAE_READ"  # "chunks": read a local dump in whole chunks, as from object storage
CACHE_ENV = "MATS_SAE_CHUNK_CACHE"  # a folder keeping chunks fetched from object storage, for later epochs and runs
FETCH_THREADS = 16  # chunk requests in flight when reading whole chunks


@dataclass(frozen=True)
class EpochPlan:
    """Which rows fill each buffer of one epoch; a pure function of (seed, epoch)."""

    block_starts: np.ndarray  # [n_blocks] global first row of each block, in visiting order
    block_lens: np.ndarray  # [n_blocks]


def default_buffer_rows(d_in: int, batch_size: int) -> int:
    rows = max(batch_size, BUFFER_BYTES // (4 * d_in))
    return rows - rows % batch_size


class ActivationLoader:
    """Yields float32 batches [batch_size, d_in] on `device`, forever, epoch after epoch.

    The last batch of an epoch holds the remaining rows (fewer than batch_size when the row count
    is not a multiple of it), so each epoch covers each row exactly once.
    """

    def __init__(self, dump: Dump, batch_size: int, seed: int, device: str | torch.device = "cpu",
                 buffer_rows: int | None = None, block_rows: int = 16,
                 rows: tuple[int, int] | None = None, prefetch_batches: int = 4,
                 whole_chunks: bool | None = None, share: tuple[int, int] | None = None):
        self.dump = dump
        self.share = share
        """(rank, world) for data-parallel training: yield only rows [rank*n//world,
        (rank+1)*n//world) of each global batch of n rows, and read only those from the dump."""
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.lo, self.hi = rows if rows is not None else (0, dump.n_rows)
        if not 0 <= self.lo < self.hi <= dump.n_rows:
            raise ValueError(f"row range {rows} outside the dump's {dump.n_rows} rows")
        buffer_rows = buffer_rows or default_buffer_rows(dump.d_in, batch_size)
        self.buffer_rows = max(batch_size, buffer_rows - buffer_rows % batch_size)
        self.block_rows = block_rows
        self.prefetch_batches = prefetch_batches
        self.rows_read = 0  # rows gathered from disk so far (a sweep reads each batch once)
        self._pin = self.device.type == "cuda"
        if whole_chunks is None:
            whole_chunks = getattr(dump, "remote", False) or os.environ.get(READ_ENV) == "chunks"
        self.whole_chunks = whole_chunks
        self._chunk_rows = [self._shard_chunk_rows(i) for i in range(dump.n_shards)] if whole_chunks else []
        self._pool: ThreadPoolExecutor | None = None

    def _shard_chunk_rows(self, index: int) -> int:
        """Rows per chunk of a shard: zarr's own chunks; for safetensors, the object-storage size."""
        chunks = getattr(self.dump.shard(index).activations, "chunks", None)
        if chunks:
            return int(chunks[0])
        return remote_chunk_rows(self.dump.d_in, 2 if self.dump.dtype != "float32" else 4)

    def _blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of the units an epoch permutes: block_rows-row blocks from `lo`, or
        with whole_chunks the shards' chunks, cut to [lo, hi)."""
        if not self.whole_chunks:
            starts = np.arange(self.lo, self.hi, self.block_rows, dtype=np.int64)
            return starts, np.minimum(self.block_rows, self.hi - starts)
        starts_l, ends_l = [], []
        for i in range(self.dump.n_shards):
            s_lo, s_hi = self.dump.shard_range(i)
            edges = np.arange(s_lo, s_hi, self._chunk_rows[i], dtype=np.int64)
            starts_l.append(np.maximum(edges, self.lo))
            ends_l.append(np.minimum(np.minimum(edges + self._chunk_rows[i], s_hi), self.hi))
        starts, ends = np.concatenate(starts_l), np.concatenate(ends_l)
        keep = ends > starts
        return starts[keep], ends[keep] - starts[keep]

    @property
    def n_rows(self) -> int:
        return self.hi - self.lo

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def batch_rows(self, index: int) -> int:
        """Rows of global batch `index` (the last of an epoch may be short), whatever `share`."""
        in_epoch = index % self.batches_per_epoch
        return min(self.batch_size, self.n_rows - in_epoch * self.batch_size)

    def share_of(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a global batch of n rows (all of them without `share`)."""
        if self.share is None:
            return 0, n
        rank, world = self.share
        return rank * n // world, (rank + 1) * n // world

    def plan(self, epoch: int) -> EpochPlan:
        starts, lens = self._blocks()
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(starts))
        return EpochPlan(starts[order], lens[order])

    def _buffer_rows_index(self, plan: EpochPlan, buffer: int) -> np.ndarray:
        """Global row ids of buffer `buffer`, sorted (file order, for sequential reads)."""
        ends = np.cumsum(plan.block_lens)
        lo, hi = buffer * self.buffer_rows, min((buffer + 1) * self.buffer_rows, self.n_rows)
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(ends, hi, side="left"))
        starts, lens = plan.block_starts[first : last + 1], plan.block_lens[first : last + 1]
        # Row ids of those blocks, one vectorised expression: each block's start + 0..len-1.
        offsets = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        idx = np.repeat(starts, lens) + offsets
        # Trim the partial blocks at both ends: buffers split the block sequence at exact rows.
        offset = lo - (int(ends[first - 1]) if first > 0 else 0)
        idx = idx[offset : offset + (hi - lo)]
        idx.sort()
        return idx

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """Read the given sorted global rows into one float32 tensor [len(rows), d_in].

        numpy, not torch, does this work: the loader threads must not share torch's intra-op
        thread pool with the training step (on a CPU, oversubscribing it slows the step).
        """
        if self.whole_chunks:
            return self._gather_chunks(rows)
        out = np.empty((len(rows), self.dump.d_in), dtype=np.float32)
        at = 0
        for i, a, b, local in self._per_shard(rows):
            arr = self.dump.shard(i).activations
            picked = np.asarray(arr.oindex[local] if hasattr(arr, "oindex") else arr[local])
            out[at : at + (b - a)] = stored_to_float32(picked, self.dump.dtype)
            at += b - a
        self.rows_read += len(rows)
        return torch.from_numpy(out)

    def _per_shard(self, rows: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """For each shard the sorted global `rows` touch: (shard, a, b, rows[a:b] inside the shard)."""
        for i in range(self.dump.n_shards):
            s_lo, s_hi = self.dump.shard_range(i)
            a, b = (int(v) for v in np.searchsorted(rows, [s_lo, s_hi]))
            if a < b:
                yield i, a, b, rows[a:b] - s_lo

    def _gather_chunks(self, rows: np.ndarray) -> torch.Tensor:
        """gather() reading every chunk the rows touch whole, FETCH_THREADS requests in flight;
        each chunk's rows are copied out as it arrives, so at most that many chunks are held."""
        from shared.shard_files import read_chunk

        out = np.empty((len(rows), self.dump.d_in), dtype=np.float32)
        jobs = []  # (shard, chunk, positions in `rows`, rows inside the chunk)
        for i, a, b, local in self._per_shard(rows):
            c = self._chunk_rows[i]
            chunk_of = local // c
            cuts = np.flatnonzero(np.diff(chunk_of)) + 1
            for pos, loc in zip(np.split(np.arange(a, b), cuts), np.split(local, cuts)):
                jobs.append((i, int(loc[0] // c), pos, loc - (loc[0] // c) * c))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="loader-fetch")
        dump = self.dump
        cache = os.environ.get(CACHE_ENV) if dump.path.capabilities.fetched else None

        def fetch(job):
            i, chunk, _, _ = job
            arr = dump.shard(i).activations
            if cache:
                return cached_chunk(Path(cache), dump, i, chunk)
            if hasattr(arr, "chunks"):  # zarr: one object per chunk, a damaged one is named
                return read_chunk(dump.path / dump.manifest.shards[i].file, "activations", arr, chunk)
            c = self._chunk_rows[i]
            return np.asarray(arr[chunk * c : (chunk + 1) * c])

        pending = []
        for job in jobs:
            pending.append((job, self._pool.submit(fetch, job)))
            if len(pending) >= 2 * FETCH_THREADS:
                self._take(out, *pending.pop(0))
        for item in pending:
            self._take(out, *item)
        self.rows_read += len(rows)
        return torch.from_numpy(out)

    def _take(self, out: np.ndarray, job: tuple, future) -> None:
        _, _, pos, inside = job
        out[pos] = stored_to_float32(future.result()[inside], self.dump.dtype)

    def _permutation(self, epoch: int, buffer: int, n: int, rows: np.ndarray | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, buffer + 1])
        if not self.whole_chunks:
            return rng.permutation(n)
        # A random order, then stably layered by each row's rank among its context's rows in that
        # order: layer r holds one random row of every context with more than r rows, shuffled.
        u = rng.permutation(n)
        ctx = rows[u] // self.dump.manifest.rows_per_context
        by_ctx = np.argsort(ctx, kind="stable")
        sorted_ctx = ctx[by_ctx]
        first = np.r_[0, np.flatnonzero(sorted_ctx[1:] != sorted_ctx[:-1]) + 1]
        sizes = np.diff(np.r_[first, n])
        rank = np.empty(n, dtype=np.int64)
        rank[by_ctx] = np.arange(n) - np.repeat(first, sizes)
        return u[np.lexsort((rng.random(n), rank))]

    def _buffers(self, start_batch: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(the rows read for one buffer, then for each batch still to emit from it the positions
        of its rows in them), in order."""
        per_buffer = self.buffer_rows // self.batch_size
        n_buffers = -(-self.n_rows // self.buffer_rows)
        epoch, in_epoch = divmod(start_batch, self.batches_per_epoch)
        while True:
            plan = self.plan(epoch)
            for buffer in range(in_epoch // per_buffer, n_buffers):
                rows = self._buffer_rows_index(plan, buffer)
                perm = self._permutation(epoch, buffer, len(rows), rows)
                skip = in_epoch - buffer * per_buffer if buffer == in_epoch // per_buffer else 0
                batches = []
                for j in range(skip, -(-len(rows) // self.batch_size)):
                    batch = perm[j * self.batch_size : (j + 1) * self.batch_size]
                    lo, hi = self.share_of(len(batch))
                    batches.append(batch[lo:hi])
                if self.share is None:
                    yield self._read(rows), batches
                else:  # read only this rank's rows of the buffer's batches
                    need = np.unique(np.concatenate(batches))
                    yield self._read(rows[need]), [np.searchsorted(need, b) for b in batches]
            epoch, in_epoch = epoch + 1, 0

    def _read(self, rows: np.ndarray) -> Any:
        """The given sorted rows read into one buffer: [len(rows), d_in] (an `AlignedLoader`: a
        tuple of them, one per dump)."""
        return self.gather(rows).numpy()

    def _batch_at(self, data: Any, positions: np.ndarray) -> Any:
        """One batch: the rows at `positions` of a buffer `_read` returned."""
        batch = torch.from_numpy(np.take(data, positions, axis=0))
        return batch.pin_memory() if self._pin else batch

    def _cut(self, buffers: Iterator[tuple[Any, list[np.ndarray]]]) -> Iterator[Any]:
        for data, batches in buffers:
            for positions in batches:
                yield self._batch_at(data, positions)

    def batches(self, start_batch: int = 0) -> Iterator[Any]:
        """Batches from global batch index `start_batch` on (with `share`, this rank's rows of each):
        [batch, d_in] tensors (an `AlignedLoader`: a tuple of them, one per dump).

        Two background threads: one gathers the next buffer from disk while the other cuts the
        current one into batches, so the optimizer does not wait on either.
        """
        buffers = background(self._buffers(start_batch), maxsize=1, name="loader-read")
        cpu = background(self._cut(buffers), maxsize=self.prefetch_batches, name="loader-batch")
        for batch in cpu:
            yield batch if self.device.type == "cpu" else _to_device(batch, self.device)


def _to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor or a tuple of them) on `device`, copied without blocking."""
    if isinstance(batch, tuple):
        return tuple(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


class AlignedLoader(ActivationLoader):
    """Several dumps of one harvest pass (checked: `train.same_pass`) in one shuffled order: each
    batch is a tuple of [batch, d_in_k] float32 tensors, one per dump, row j of each being the same
    dump row (the same token), whatever the dumps' widths and formats.

    The order is the single-dump loader's, computed once for all: with `block_rows` blocks it is
    exactly the first dump's own order; reading whole chunks, the blocks are the chunks of the
    dump with the largest chunks (chunk rows are powers of two, so each such block covers whole
    chunks of every other dump), cut also at every dump's shard boundaries, so no block straddles
    a chunk or a shard of any dump and the order never depends on the widths.
    """

    def __init__(self, dumps: Sequence[Dump], batch_size: int, seed: int, device: str | torch.device = "cpu",
                 buffer_rows: int | None = None, block_rows: int = 16,
                 rows: tuple[int, int] | None = None, prefetch_batches: int = 4,
                 whole_chunks: bool | None = None, share: tuple[int, int] | None = None):
        dumps = list(dumps)
        if len(dumps) < 2:
            raise ValueError("an aligned loader reads two dumps or more")
        check_same_pass(dumps)
        if whole_chunks is None:
            whole_chunks = any(d.remote for d in dumps) or os.environ.get(READ_ENV) == "chunks"
        # The buffer holds every dump's rows: size it by their summed width.
        buffer_rows = buffer_rows or default_buffer_rows(sum(d.d_in for d in dumps), batch_size)
        super().__init__(dumps[0], batch_size, seed, device, buffer_rows, block_rows, rows, prefetch_batches,
                         whole_chunks, share)
        self.dumps = dumps
        self.readers = [ActivationLoader(d, batch_size, seed, "cpu", self.buffer_rows, block_rows, rows,
                                         whole_chunks=whole_chunks) for d in dumps]
        """One reader per dump: only their `gather` is used (the order is this loader's)."""

    def _blocks(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.whole_chunks:
            return super()._blocks()
        widest = max(self.readers, key=lambda r: max(r._chunk_rows, default=0))  # the first of the largest
        starts, _ = widest._blocks()
        shard_starts = [d.shard_range(i)[0] for d in self.dumps for i in range(d.n_shards)]
        edges = np.unique(np.concatenate([starts, np.asarray(shard_starts, dtype=np.int64)]))
        edges = edges[(edges >= self.lo) & (edges < self.hi)]
        return edges, np.diff(np.r_[edges, self.hi])

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """The given sorted global rows of every dump: one float32 [len(rows), d_in_k] each."""
        parts = tuple(reader.gather(rows) for reader in self.readers)
        self.rows_read += len(rows)
        return parts

    def _read(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(part.numpy() for part in self.gather(rows))

    def _batch_at(self, data: tuple[np.ndarray, ...], positions: np.ndarray) -> tuple[torch.Tensor, ...]:
        return tuple(super(AlignedLoader, self)._batch_at(part, positions) for part in data)


def cached_chunk(cache: Path, dump: Dump, shard: int, chunk: int) -> np.ndarray:
    """Activation chunk `chunk` of shard `shard`, from the local cache when it holds a copy whose
    sha256 still matches, else fetched (crc32c-checked) and kept there.

    Entries are named by the shard's manifest checksum, so a re-harvested dump (or another prefix
    holding other data) never reads stale chunks; a damaged entry is fetched again.
    """
    from shared.shard_files import read_chunk

    entry = dump.manifest.shards[shard]
    folder = cache / entry.checksum.split(":", 1)[1][:32]
    path = folder / f"activations.{chunk}.npy"
    digest = path.with_suffix(".sha256")
    if path.is_file() and digest.is_file():
        try:
            data = np.load(path, allow_pickle=False)
            if hashlib.sha256(data.tobytes()).hexdigest() == digest.read_text().strip():
                return data
        except (OSError, ValueError):
            pass
    data = read_chunk(dump.path / entry.file, "activations", dump.shard(shard).activations, chunk)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, data)
        os.replace(tmp, path)
        digest.write_text(hashlib.sha256(data.tobytes()).hexdigest())
    except OSError:
        pass  # a full or read-only cache only costs the next fetch
    return data
