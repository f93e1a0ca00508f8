"""Open a dump by path, validate it, and serve its rows memory-mapped without copying."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.dump_files import check_entry, check_tree
from shared.errors import DumpError, UserError
from shared.manifest import Manifest, ShardEntry, read_manifest
from shared.storage import Location, location
from shared.shard_files import INDEX_DTYPES, ShardArrays, activations_to_torch, checksum, open_shard
from shared.zarr_chunks import check_chunks_stored


@dataclass
class Dump:
    """A validated dump. Rows are numbered 0..n_rows-1 across shards in manifest order."""

    path: Location
    manifest: Manifest
    _shards: list[ShardArrays] = field(default_factory=list, repr=False)
    _starts: list[int] = field(default_factory=list, repr=False)

    @property
    def remote(self) -> bool:
        """Every read is a request (object storage): rows are fetched in whole chunks."""
        return self.path.capabilities.fetched

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

    def verify(self, progress: bool = False) -> None:
        """Recompute every shard checksum; DumpError naming the first file that differs (in object
        storage, a chunk object whose crc32c fails is named first). With `progress`, a bar on
        stderr counts the rows whose bytes are hashed, inside a shard too (a dump may be one
        large shard)."""
        from shared.progress import bar

        with bar(self.n_rows, f"verify {self.path.name}", "row", progress, unit_scale=True) as shown:
            for entry in self.manifest.shards:
                path = self.path / entry.file
                first = entry.first_row

                def advance(fraction: float, first: int = first, rows: int = entry.rows) -> None:
                    shown.update(first + int(rows * fraction) - shown.n)

                got = checksum(path, self.manifest.format, advance)
                if got != entry.checksum:
                    raise DumpError(
                        f"{path} fails its checksum (manifest {entry.checksum[:19]}..., file "
                        f"{got[:19]}...): the shard is corrupted; re-harvest the dump"
                    )


def _check_shapes(path: Path, arrays: ShardArrays, rows: int, d_in: int) -> None:
    shape = tuple(arrays.activations.shape)
    if shape != (rows, d_in):
        raise DumpError(f"{path} holds activations of shape {shape}, manifest says ({rows}, {d_in}); "
                        "the shard is damaged, re-harvest the dump")
    for name in INDEX_DTYPES:
        if tuple(getattr(arrays, name).shape) != (rows,):
            raise DumpError(f"{path}: '{name}' has shape {tuple(getattr(arrays, name).shape)}, "
                            f"manifest says ({rows},); re-harvest the dump")


def _check_dtypes(path: Path, arrays: ShardArrays, dtype: str) -> None:
    """The bytes are what the manifest says: float32 bytes read as bfloat16 would be garbage that
    no checksum notices (the checksum covers the file, not its interpretation)."""
    if arrays.storage_dtype != dtype:
        raise DumpError(f"{path} stores {arrays.storage_dtype or 'unknown'} activations but the "
                        f"manifest says dtype {dtype}; the manifest does not describe this shard, "
                        "re-harvest the dump")
    for name, expected in INDEX_DTYPES.items():
        if np.dtype(getattr(arrays, name).dtype) != np.dtype(expected):
            raise DumpError(f"{path}: '{name}' is {np.dtype(getattr(arrays, name).dtype)}, not "
                            f"{np.dtype(expected)}; re-harvest the dump")


def _check_contexts(path: Path, arrays: ShardArrays, first_row: int, rows: int, rpc: int) -> None:
    """Rows are stored context by context, so a shard's first and last rows name known contexts.

    Reads two numbers per shard, and catches shards swapped or copied from another dump even
    without `verify`.
    """
    expected = (first_row // rpc, (first_row + rows - 1) // rpc)
    got = (int(arrays.context[0]), int(arrays.context[rows - 1]))
    if got != expected:
        raise DumpError(f"{path} holds contexts {got[0]}..{got[1]}, but its manifest rows belong to "
                        f"contexts {expected[0]}..{expected[1]}: shards were swapped or come from "
                        "another dump; re-harvest the dump")


_EXPECTED = {"safetensors": ("a file", "a safetensors file"), "zarr": ("a folder", "a zarr folder")}


def _check_local_entries(folder: Location, file: Location, fmt: str) -> None:
    """On disk, before anything opens the shard: it is what its format says, and neither it nor
    (for zarr) anything below it is a symlink out of the dump or a special file (shared.dump_files)."""
    if not folder.capabilities.folders:  # object storage: no symlinks, no special files
        return
    if check_entry(folder, file, *_EXPECTED[fmt]) and fmt == "zarr":
        check_tree(folder, file)


def _open_shard_checked(folder: Location, manifest: Manifest, entry: ShardEntry) -> ShardArrays:
    file = folder / entry.file
    try:
        _check_local_entries(folder, file, manifest.format)
        arrays = open_shard(file, manifest.format)
        if manifest.format == "zarr":  # zarr would read a missing chunk as zeros
            check_chunks_stored(file, arrays)
        _check_shapes(file, arrays, entry.rows, manifest.d_in)
        _check_dtypes(file, arrays, manifest.dtype)
        _check_contexts(file, arrays, entry.first_row, entry.rows, manifest.rows_per_context)
    except Exception as e:
        # A fetched shard can fail in as many ways as the network: name it, in one line.
        if not file.capabilities.fetched or isinstance(e, UserError):
            raise
        raise DumpError(f"{file} cannot be read ({type(e).__name__}: {str(e)[:160]}); "
                        "re-harvest the dump") from None
    return arrays


def open_dump(path: str | Path | Location, verify: bool = False, require_complete: bool = True,
              progress: bool = False) -> Dump:
    """Open the dump in folder `path` (or object-storage prefix `s3://bucket/prefix`).

    Checks every field of the manifest (shared.manifest_check), that every shard it lists exists
    inside the folder with the stated shape and dtypes and holds the contexts its rows should
    (truncation and swapped shards show here), and with `verify=True` every checksum, which also
    catches changed bytes (a NaN written over an activation), shown as a bar on stderr with
    `progress`. Refuses an incomplete dump unless asked not to.
    """
    path = location(path)
    # Without folders (object storage) a missing bucket, bad keys or no endpoint show in one line
    # when the manifest is read; an empty prefix holds no manifest.
    if path.capabilities.folders and not path.exists():
        raise DumpError(f"{path} does not exist; harvest a dump there first (`harvest --out {path}`)")
    manifest = read_manifest(path)
    if require_complete and not manifest.complete:
        raise DumpError(f"{path} is an incomplete dump (harvest was interrupted); "
                        f"finish it with `harvest --resume --out {path}` and the same options")
    # Row continuity and totals were checked with the manifest; here only the files remain.
    if path.capabilities.fetched:  # a few small requests per shard: many in flight
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16) as pool:
            shards = list(pool.map(lambda e: _open_shard_checked(path, manifest, e), manifest.shards))
    else:
        shards = [_open_shard_checked(path, manifest, entry) for entry in manifest.shards]
    starts = [entry.first_row for entry in manifest.shards]
    dump = Dump(path=path, manifest=manifest, _shards=shards, _starts=starts)
    if verify:
        dump.verify(progress)
    return dump
