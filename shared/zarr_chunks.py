"""Every chunk a zarr shard's shape implies is stored: zarr reads a chunk that is not as the
fill value (zeros), so a lost chunk file or object would pass for rows of zeros, with or without
checksum verification being asked for.

Checked when the shard is opened, from one listing of the shard (a folder walk on disk, a list
request per 1,000 objects in a bucket): no chunk is read. Shards written before every chunk was
stored (no `every_chunk_stored` attribute) skip chunks of zeros legitimately; for them only
`activations` is held to it, where a whole chunk of exact zeros in every dimension is no model's
output (and `--verify` still checks the rest).
"""
from __future__ import annotations

import itertools
from typing import Any

from shared.errors import DumpError
from shared.shard_files import ARRAY_NAMES, ShardArrays
from shared.storage import Location


def expected_chunks(name: str, arr: Any) -> list[str]:
    """The chunk keys of array `name` relative to the shard (zarr v3's default key encoding,
    `c/i/j`): one per cell of its chunk grid (write_zarr: chunks along rows only)."""
    grid = [range(-(-int(n) // int(c))) for n, c in zip(arr.shape, arr.chunks)]
    return [f"{name}/c/" + "/".join(map(str, cell)) for cell in itertools.product(*grid)]


def check_chunks_stored(shard: Location, arrays: ShardArrays) -> None:
    """A DumpError naming the first chunk of `shard` that is not stored (see the module docstring)."""
    names = ARRAY_NAMES if arrays.every_chunk_stored else ("activations",)
    stored = set(shard.list_names())
    for name in names:
        for key in expected_chunks(name, getattr(arrays, name)):
            if key not in stored:
                raise DumpError(f"{shard}/{key} is missing: the zarr shard lost a chunk (zarr would "
                                "read it as zeros); re-harvest the dump")
