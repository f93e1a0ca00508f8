"""Write shards and whole dumps in the public format (harvest streams through `write_shard`;
`write_dump` turns in-memory activations into a dump, for tests, benchmarks and imports)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import torch

from shared import atomic
from shared.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, ShardEntry, fingerprint, shard_name
from shared.errors import UserError
from shared.shard_files import (
    arrays_checksum, as_numpy, checksum, stored_to_float32, write_safetensors, write_zarr,
)
from shared.storage import Location, location

_STATS_CHUNK = 32768  # rows per float64 chunk when summing statistics (bounds temporary memory)


def shard_stats(acts: torch.Tensor) -> tuple[list[float], float, float]:
    """float64 (per-dim sum, sum of squared norms, sum of norms) over rows, in fixed-size chunks.

    In numpy: harvest calls this from its writer thread, which must not compete with the forward
    pass for torch's intra-op thread pool.
    """
    dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[acts.dtype]
    words = as_numpy(acts)
    total = np.zeros(acts.shape[1], dtype=np.float64)
    sq = norm = 0.0
    for start in range(0, acts.shape[0], _STATS_CHUNK):
        chunk = stored_to_float32(words[start : start + _STATS_CHUNK], dtype).astype(np.float64)
        total += chunk.sum(0)
        row_sq = np.einsum("ij,ij->i", chunk, chunk)
        sq += float(row_sq.sum())
        norm += float(np.sqrt(row_sq).sum())
    return total.tolist(), sq, norm


def write_shard(folder: Path | Location, manifest: Manifest, index: int, first_row: int, acts: torch.Tensor,
                tokens: np.ndarray, context: np.ndarray, position: np.ndarray,
                stats: tuple[list[float], float, float] | None = None) -> ShardEntry:
    """Write one shard atomically and return its manifest entry: on disk under a temp name, then
    fsync + rename; in object storage in place, after deleting whatever a crashed harvest left
    there (only the manifest, written after this, makes it part of the dump).

    `stats` is `shard_stats(acts)` when the caller computed it already.
    """
    name = shard_name(index, manifest.format)
    total, sq, norm = stats if stats is not None else shard_stats(acts)
    arrays = {"activations": acts, "tokens": torch.from_numpy(np.ascontiguousarray(tokens, np.int32)),
              "context": torch.from_numpy(np.ascontiguousarray(context, np.int64)),
              "position": torch.from_numpy(np.ascontiguousarray(position, np.int32))}
    final = location(folder) / name
    formats = final.capabilities.formats
    if manifest.format not in formats:
        raise UserError(f"{folder}: dumps in {final.kind} are written as {' or '.join(formats)} "
                        f"(--format {formats[0]})")
    with final.staged() as target:
        if manifest.format == "safetensors":
            digest = write_safetensors(target, arrays)
        else:
            write_zarr(target, arrays, manifest.compression)
            # Where reading back is a request per chunk, the checksum comes from the arrays as
            # written (the same value `checksum` computes).
            fetched = target.capabilities.fetched
            digest = arrays_checksum(arrays) if fetched else checksum(target, manifest.format)
    return ShardEntry(file=name, rows=len(acts), first_row=first_row, checksum=digest, sum=total,
                      sum_sq_norm=sq, sum_norm=norm)


def write_dump(folder: str | Path | Location, activations: torch.Tensor, context_size: int, shard_rows: int,
               tokens: np.ndarray | None = None, hook: str = "synthetic", model: str = "synthetic",
               fmt: str = "safetensors") -> Manifest:
    """Write `activations` [rows, d_in] (rows ordered context by context) as a complete dump."""
    folder = location(folder)
    folder.ensure_folder()
    n, d_in = activations.shape
    if n % context_size:
        raise ValueError(f"{n} rows is not a whole number of {context_size}-row contexts")
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[activations.dtype]
    tokens = np.zeros(n, np.int32) if tokens is None else tokens
    context = np.repeat(np.arange(n // context_size, dtype=np.int64), context_size)
    position = np.tile(np.arange(context_size, dtype=np.int32), n // context_size)
    cfg = {"model": model, "hook": hook, "context_size": context_size, "rows": n, "d_in": d_in}
    m = Manifest(
        format_version=FORMAT_VERSION, complete=False, format=fmt, model=model, model_fingerprint="",
        config_fingerprint=fingerprint(cfg), hook=hook, layer=None, d_in=d_in, dtype=dtype,
        context_size=context_size, rows_per_context=context_size, dataset="synthetic", split="train",
        column="tokens", tokenized=True, tokenizer=None, bos_token_id=None, prepend_bos=False,
        skip_bos=False, shard_rows=shard_rows, n_rows=0, n_contexts=n // context_size, n_tokens=n, shards=[],
        stats=None, harvest_config=cfg, versions={},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    for i, start in enumerate(range(0, n, shard_rows)):
        sl = slice(start, start + shard_rows)
        m.shards.append(write_shard(folder, m, i, start, activations[sl], tokens[sl], context[sl], position[sl]))
    m.n_rows = n
    m.finalize_stats()
    m.complete = True
    atomic.write_json(folder / MANIFEST_NAME, m.to_dict())
    return m
