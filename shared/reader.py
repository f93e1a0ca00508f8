"""Open a dump by path, validate it, and serve its rows memory-mapped without copying."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.errors import DumpError
from shared.manifest import Manifest, read_manifest
from shared.shard_files import ShardArrays, activations_to_torch, checksum, open_shard


@dataclass
class Dump:
    """A validated dump. Rows are numbered 0..n_rows-1 across shards in manifest order."""

    path: Path
    manifest: Manifest
    _shards: list[ShardArrays] = field(default_factory=list, repr=False)
    _starts: list[int] = field(default_factory=list, repr=False)

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    @property
    def d_in(self) -> int:
        return self.manifest.d_in

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def shard(self, index: int) -> ShardArrays:
        """The arrays of one shard (memory-mapped for safetensors, lazy for zarr)."""
        return self._shards[index]

    def shard_range(self, index: int) -> tuple[int, int]:
        entry = self.manifest.shards[index]
        return entry.first_row, entry.first_row + entry.rows

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row inside that shard) of a global row."""
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} outside [0, {self.n_rows})")
        i = bisect.bisect_right(self._starts, row) - 1
        return i, row - self._starts[i]

    def _slices(self, name: str, start: int, stop: int) -> list[np.ndarray]:
        """Array `name` for rows [start, stop), one slice per shard the range touches."""
        parts = []
        row = start
        while row < stop:
            i, local = self.locate(row)
            take = min(stop - row, self.manifest.shards[i].rows - local)
            parts.append(np.asarray(getattr(self._shards[i], name)[local : local + take]))
            row += take
        return parts

    def activations(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a torch tensor in the storage dtype.

        A zero-copy view when the range lies inside one safetensors shard; a copy otherwise.
        """
        parts = self._slices("activations", start, stop)
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return activations_to_torch(arr, self.dtype)

    def column(self, name: str, start: int, stop: int) -> np.ndarray:
        """`tokens`, `context` or `position` for rows [start, stop)."""
        parts = self._slices(name, start, stop)
        return np.concatenate(parts) if parts else np.zeros(0)

    def verify(self) -> None:
        """Recompute every shard checksum; DumpError naming the first file that differs."""
        for entry in self.manifest.shards:
            path = self.path / entry.file
            got = checksum(path, self.manifest.format)
            if got != entry.checksum:
                raise DumpError(
                    f"{path} fails its checksum (manifest {entry.checksum[:19]}..., file "
                    f"{got[:19]}...): the shard is corrupted; re-harvest the dump"
                )


def _check_shard(path: Path, arrays: ShardArrays, rows: int, d_in: int) -> None:
    shape = tuple(arrays.activations.shape)
    if shape != (rows, d_in):
        raise DumpError(f"{path} holds activations of shape {shape}, manifest says ({rows}, {d_in}); "
                        "the shard is damaged, re-harvest the dump")
    for name in ("tokens", "context", "position"):
        if tuple(getattr(arrays, name).shape) != (rows,):
            raise DumpError(f"{path}: '{name}' has {getattr(arrays, name).shape[0]} rows, "
                            f"manifest says {rows}; re-harvest the dump")


def open_dump(path: str | Path, verify: bool = False, require_complete: bool = True) -> Dump:
    """Open the dump in folder `path`.

    Checks the manifest, that every shard it lists exists with the stated shape (truncation shows
    here), and with `verify=True` every checksum. Refuses an incomplete dump unless asked not to.
    """
    path = Path(path)
    if not path.exists():
        raise DumpError(f"{path} does not exist; harvest a dump there first (`harvest --out {path}`)")
    manifest = read_manifest(path)
    if require_complete and not manifest.complete:
        raise DumpError(f"{path} is an incomplete dump (harvest was interrupted); "
                        f"finish it with `harvest --resume --out {path}` and the same options")
    shards, starts, row = [], [], 0
    for entry in manifest.shards:
        if entry.first_row != row:
            raise DumpError(f"{path}/manifest.json: shard {entry.file} starts at row {entry.first_row}, "
                            f"expected {row}; re-harvest the dump")
        file = path / entry.file
        arrays = open_shard(file, manifest.format)
        _check_shard(file, arrays, entry.rows, manifest.d_in)
        shards.append(arrays)
        starts.append(row)
        row += entry.rows
    if manifest.complete and row != manifest.n_rows:
        raise DumpError(f"{path}/manifest.json lists {row} rows in shards but n_rows={manifest.n_rows}")
    dump = Dump(path=path, manifest=manifest, _shards=shards, _starts=starts)
    if verify:
        dump.verify()
    return dump
