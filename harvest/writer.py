"""Per-hook shard writer: fills shard buffers from forward passes, writes each shard whole in a
background thread that overlaps the next forward, and records it in the harvest's ledger.

It writes the shards it is given (all those still to do in a single process, a rank's share
under torchrun) and drops the rows of any other shard, so every process runs the same writer.
Memory is bounded: each hook owns two shard buffers, one filling while the other is written.
Durability order: shard temp file -> fsync -> rename -> entry recorded (itself atomic).
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from harvest.ledger import Ledger
from shared.dump_writer import shard_stats, write_shard
from shared.errors import UserError
from shared.manifest import Manifest, shard_name
from shared.shard_files import TORCH_DTYPE
from shared.storage import Location

_CHECK_CHUNK = 32768  # rows per isfinite check (bounds temporary memory)


class NonFiniteActivations(UserError):
    pass


@dataclass
class ShardBuffer:
    index: int
    first_row: int
    acts: torch.Tensor  # [capacity, d_in], storage dtype, pinned on CUDA
    tokens: np.ndarray  # [capacity] int32
    context: np.ndarray  # [capacity] int64
    position: np.ndarray  # [capacity] int32
    fill: int = 0
    copied: torch.cuda.Event | None = field(default=None, repr=False)


def first_non_finite(acts: torch.Tensor) -> int | None:
    for start in range(0, acts.shape[0], _CHECK_CHUNK):
        ok = torch.isfinite(acts[start : start + _CHECK_CHUNK]).all(dim=1)
        if not bool(ok.all()):
            return start + int((~ok).nonzero()[0, 0])
    return None


class ShardWriter:
    """Receives one hook's rows in row order and turns the shards in `writes` into durable shards.

    Rows of other shards (already on disk, or another rank's) are dropped as they arrive.
    """

    def __init__(self, folder: Location, manifest: Manifest, n_rows: int,
                 writes: frozenset[int], ledger: Ledger, pin_memory: bool):
        self.folder = folder
        self.manifest = manifest
        self.n_rows = n_rows
        self.writes = writes
        self.ledger = ledger
        self._pin = pin_memory
        self._capacity = min(manifest.shard_rows, max(1, n_rows))
        self._free: queue.Queue[ShardBuffer | None] = queue.Queue()
        self._n_buffers = 0
        self._todo: queue.Queue[ShardBuffer | None] = queue.Queue()
        self._current: ShardBuffer | None = None
        self.error: BaseException | None = None
        self.bytes_written = 0
        """Bytes of the shards written and recorded (activations + 16 bytes of indices per row)."""
        self.bytes_taken = 0
        """Bytes of the rows taken into this writer's buffers so far, counted as `bytes_written`
        counts them: written + still buffered (a shard is written only once whole)."""
        self._thread = threading.Thread(target=self._loop, name=f"writer-{manifest.hook}", daemon=True)
        self._thread.start()

    def shard_end(self, index: int) -> int:
        """One past the last row of shard `index`."""
        return min((index + 1) * self.manifest.shard_rows, self.n_rows)

    # ---- main thread -------------------------------------------------------------------------
    def _new_buffer(self, index: int, first_row: int) -> ShardBuffer:
        if self._n_buffers < 2:
            self._n_buffers += 1
            cap, d = self._capacity, self.manifest.d_in
            acts = torch.empty((cap, d), dtype=TORCH_DTYPE[self.manifest.dtype], pin_memory=self._pin)
            buf = ShardBuffer(index, first_row, acts, np.empty(cap, np.int32), np.empty(cap, np.int64),
                              np.empty(cap, np.int32))
        else:
            got = self._free.get()  # waits while the writer still holds both buffers
            self.raise_if_failed()
            assert got is not None
            buf = got
            buf.index, buf.first_row, buf.fill = index, first_row, 0
        return buf

    def add(self, first_row: int, acts: torch.Tensor, tokens: np.ndarray, context: np.ndarray,
            position: np.ndarray) -> None:
        """Take rows [first_row, first_row + len(acts)) (acts [rows, d_in] in the storage dtype;
        tokens, context, position [rows]); rows of shards not in `writes` are dropped."""
        self.raise_if_failed()
        n = acts.shape[0]
        at = 0
        while at < n:
            row = first_row + at
            index = row // self.manifest.shard_rows
            take = min(n - at, self.shard_end(index) - row)
            if index in self.writes:
                self._copy(index, row, slice(at, at + take), acts, tokens, context, position)
                self.bytes_taken += take * (acts.shape[1] * acts.element_size() + 16)
            at += take

    def _copy(self, index: int, row: int, rows: slice, acts: torch.Tensor, tokens: np.ndarray,
              context: np.ndarray, position: np.ndarray) -> None:
        """Rows `rows` of a batch, which are rows [row, ...) of the dump, into shard `index`'s buffer."""
        if self._current is None:
            # A shard is filled from its first row: a rank forwards every batch of its shards.
            assert row == index * self.manifest.shard_rows, (index, row)
            self._current = self._new_buffer(index, row)
        buf = self._current
        assert buf.index == index and row == buf.first_row + buf.fill, (index, row, buf.index, buf.fill)
        take = rows.stop - rows.start
        sl = slice(buf.fill, buf.fill + take)
        buf.acts[sl].copy_(acts[rows], non_blocking=self._pin)
        buf.tokens[sl] = tokens[rows]
        buf.context[sl] = context[rows]
        buf.position[sl] = position[rows]
        buf.fill += take
        if buf.first_row + buf.fill == self.shard_end(index):
            self._submit()

    def _submit(self) -> None:
        buf = self._current
        assert buf is not None
        if self._pin:  # the non-blocking device->host copies must land before the writer reads
            buf.copied = torch.cuda.Event()
            buf.copied.record()
        self._todo.put(buf)
        self._current = None

    def finish(self) -> None:
        """Wait until every shard handed over is durable and recorded (errors re-raise here)."""
        partial = self._current
        self._todo.put(None)
        self._thread.join()
        self.raise_if_failed()
        if partial is not None:  # the forward stopped inside one of this process's shards
            raise RuntimeError(f"{self.folder}: shard {partial.index} got only {partial.fill} rows")

    def abort(self) -> None:
        self._todo.put(None)
        self._free.put(None)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # ---- writer thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while (buf := self._todo.get()) is not None:
            try:
                self._write(buf)
            except BaseException as e:  # surfaced to the main thread on its next call
                self.error = e
                self._free.put(buf)
                return
            self._free.put(buf)

    def _write(self, buf: ShardBuffer) -> None:
        if buf.copied is not None:
            buf.copied.synchronize()
        m = self.manifest
        n = buf.fill
        acts = buf.acts[:n]
        name = shard_name(buf.index, m.format)
        # One pass for the statistics; a NaN or inf anywhere makes their sum non-finite, and only
        # then is the shard scanned again to name the first bad row.
        stats = shard_stats(acts)
        bad = None if math.isfinite(stats[1]) else first_non_finite(acts)
        if bad is not None:
            raise NonFiniteActivations(
                f"non-finite activation in {name} at row {bad} (dump row {buf.first_row + bad}, "
                f"context {buf.context[bad]}, position {buf.position[bad]}); try --model-dtype float32 "
                "or check the model"
            )
        entry = write_shard(self.folder, m, buf.index, buf.first_row, acts, buf.tokens[:n],
                            buf.context[:n], buf.position[:n], stats=stats)
        self.ledger.record(buf.index, entry)
        self.bytes_written += acts.numel() * acts.element_size() + n * 16
