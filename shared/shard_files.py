"""Reading and writing one shard file: `activations`, `tokens`, `context`, `position`.

safetensors shards are read by memory-mapping the tensors in place (no copy); zarr shards are
chunked arrays read lazily. Both give objects that slice like numpy arrays.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared.errors import DumpError, UserError
from shared.storage import Location, location

# numpy has no bfloat16: such activations are stored/mapped as their raw 16-bit words.
_NP_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_ST_CODE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}
_ST_STORAGE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
INDEX_DTYPES = {"tokens": np.int32, "context": np.int64, "position": np.int32}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ZARR_CHUNK_ROWS = 16384
REMOTE_CHUNK_BYTES = 16 << 20  # object-storage chunks: about this many bytes of activations
ARRAY_NAMES = ("activations", "tokens", "context", "position")
EVERY_CHUNK_STORED = "every_chunk_stored"


def remote_chunk_rows(d_in: int, itemsize: int) -> int:
    """Rows per chunk object of a dump in object storage: the largest power of two whose
    activations fit REMOTE_CHUNK_BYTES, between 1,024 and 16,384 rows (4,096 at d_in 576 float32)."""
    rows = max(1, REMOTE_CHUNK_BYTES // max(1, d_in * itemsize))
    return int(min(_ZARR_CHUNK_ROWS, max(1024, 1 << (rows.bit_length() - 1))))


@dataclass
class ShardArrays:
    """The four arrays of one shard; each slices like a numpy array along rows."""

    activations: Any  # [rows, d_in], storage dtype (bfloat16 as uint16 words)
    tokens: Any  # [rows] int32: the token at that row
    context: Any  # [rows] int64: global context index
    position: Any  # [rows] int32: position inside the context
    storage_dtype: str | None = None
    """What the file says its activations are ("float32", "bfloat16", "float16"; None if none of
    them): numpy maps bfloat16 as uint16, so the array's dtype alone cannot tell."""
    every_chunk_stored: bool = False
    """zarr: the shard says every chunk was written, those equal to the fill value too (the
    `every_chunk_stored` group attribute), so a chunk not stored is a lost one (zarr would read it
    as zeros). Shards written before it existed skip chunks of zeros."""


def stored_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored activations (numpy) -> float32; bfloat16 words become the top half of float32 bits."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def activations_to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """View (not copy) numpy activations as a torch tensor of the storage dtype."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


_ST_NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32",
            torch.int64: "I64"}
_WRITE_CHUNK = 1 << 24


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file straight from the tensors' memory; returns its sha256 checksum.

    Written here rather than with safetensors.save_file, which first copies every tensor into a
    bytes object (a third shard-sized buffer) and leaves the checksum to a second read of the file.
    The layout is the standard one: u64 header length, JSON header padded to 8 bytes, raw data.
    """
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(raw)), raw):
            f.write(part)
            digest.update(part)
        for t in tensors.values():
            data = memoryview(as_numpy(t)).cast("B")
            for start in range(0, len(data), _WRITE_CHUNK):
                block = data[start : start + _WRITE_CHUNK]
                f.write(block)
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def write_zarr(path: Path | Location, tensors: dict[str, torch.Tensor], compression: str | None) -> None:
    """One zarr v3 group of the four arrays. Where every read is a request (object storage),
    every chunk object also carries a crc32c of its bytes (checked on every read), and chunks are
    sized by `remote_chunk_rows`."""
    import zarr

    path = location(path)
    fetched = path.capabilities.fetched
    compressors: Any = [] if fetched else None
    if compression == "zstd":
        compressors = [zarr.codecs.ZstdCodec(level=3)]
    chunk_rows = _ZARR_CHUNK_ROWS
    if fetched:
        compressors = [*compressors, zarr.codecs.Crc32cCodec()]
        acts = tensors["activations"]
        chunk_rows = remote_chunk_rows(acts.shape[1], acts.element_size())
    with path.errors():
        group = zarr.open_group(path.zarr_store(read_only=False), mode="w", zarr_format=3)
        _fill_group(group, tensors, compressors, chunk_rows)
        group.attrs[EVERY_CHUNK_STORED] = True


def _fill_group(group: Any, tensors: dict[str, torch.Tensor], compressors: Any, chunk_rows: int) -> None:
    for name, t in tensors.items():
        data = as_numpy(t)
        chunks = (min(chunk_rows, max(1, data.shape[0])),) + data.shape[1:]
        # Chunks of zeros are written too (zarr skips them by default), so that a reader can tell
        # a lost chunk from one of zeros by listing the store.
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                 compressors=compressors, config={"write_empty_chunks": True})
        if t.dtype == torch.bfloat16:
            arr.attrs["storage_dtype"] = "bfloat16"
        arr[...] = data


def arrays_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """What `checksum` computes for a zarr shard, from the arrays in memory (as written)."""
    h = hashlib.sha256()
    for name in ARRAY_NAMES:
        h.update(memoryview(np.ascontiguousarray(as_numpy(tensors[name]))).cast("B"))
    return "sha256:" + h.hexdigest()


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse the JSON header; returns (header, offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DumpError(f"{path} is truncated (no safetensors header); re-harvest or --resume")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise DumpError(f"{path} is corrupted (bad safetensors header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DumpError(f"{path} is corrupted (unreadable safetensors header)") from None
    if not isinstance(header, dict) or not all(_header_entry_ok(v) for k, v in header.items()
                                               if k != "__metadata__"):
        raise DumpError(f"{path} is corrupted (malformed safetensors header); re-harvest the dump")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise DumpError(
            f"{path} is truncated or padded: {size} bytes on disk, header says {8 + n + end}; "
            "re-harvest the dump (or `harvest --resume` if it was interrupted)"
        )
    return header, 8 + n


def _header_entry_ok(info: Any) -> bool:
    """One tensor's header entry: a dtype this format uses, a shape, and its byte range."""
    try:
        begin, end = info["data_offsets"]
        return (info["dtype"] in _ST_CODE and all(isinstance(d, int) and d >= 0 for d in info["shape"])
                and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
    except (TypeError, KeyError, ValueError):
        return False


def open_safetensors(path: Path) -> ShardArrays:
    """Memory-map each tensor of a shard where it lies in the file."""
    if not path.is_file():
        raise DumpError(f"shard {path} is missing; the dump is damaged, re-harvest it")
    header, base = _safetensors_header(path)
    views = {}
    for name in ("activations", "tokens", "context", "position"):
        if name not in header:
            raise DumpError(f"{path} has no '{name}' tensor; it was not written by harvest")
        info = header[name]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        # A byte range that disagrees with the shape would map the wrong bytes or run off the end.
        if end - begin != np.dtype(_ST_CODE[info["dtype"]]).itemsize * int(np.prod(shape)):
            raise DumpError(f"{path}: '{name}' spans {end - begin} bytes, not its shape {list(shape)} "
                            f"in {info['dtype']}; the shard is corrupted, re-harvest the dump")
        if end == begin:
            views[name] = np.zeros(shape, dtype=_ST_CODE[info["dtype"]])
            continue
        # mode "c" (copy-on-write) gives a writable, zero-copy mapping torch accepts without warning.
        views[name] = np.memmap(path, dtype=_ST_CODE[info["dtype"]], mode="c",
                                offset=base + begin, shape=shape)
    return ShardArrays(**views, storage_dtype=_ST_STORAGE.get(header["activations"]["dtype"]))


def open_zarr(path: Path | Location) -> ShardArrays:
    """The four arrays of a zarr shard, read lazily; a DumpError saying what is wrong with it."""
    import zarr

    path = location(path)
    try:
        with path.errors():
            group = zarr.open_group(path.zarr_store(read_only=True), mode="r")
            arrays = {n: group[n] for n in ARRAY_NAMES}
            every = group.attrs.get(EVERY_CHUNK_STORED) is True
    except DumpError:
        raise
    except UserError as e:  # the storage failed (explained in one line), not the shard
        raise DumpError(str(e)) from None
    except FileNotFoundError:
        raise DumpError(f"shard {path} is missing; the dump is damaged, re-harvest it") from None
    except KeyError as e:
        raise DumpError(f"{path} has no array {e}; the shard is damaged, re-harvest the dump") from None
    except Exception as e:  # zarr raises many types for a damaged store
        raise DumpError(f"{path} is corrupted or incomplete ({type(e).__name__}: {e})") from None
    return ShardArrays(**arrays, storage_dtype=_zarr_storage_dtype(arrays["activations"]),
                       every_chunk_stored=every)


def chunk_key(path: Path | Location, name: str, arr: Any, chunk: int) -> str:
    """The object (or file) holding chunk `chunk` (along rows) of array `name` of a zarr shard."""
    return f"{path}/{name}/c/{chunk}" + "/0" * (len(arr.shape) - 1)


def read_chunk(path: Path | Location, name: str, arr: Any, chunk: int) -> np.ndarray:
    """Chunk `chunk` of a zarr array, decoded; a DumpError naming the object if it is damaged
    (crc32c mismatch, bad compression) or unreadable."""
    rows = arr.chunks[0]
    try:
        return np.asarray(arr[chunk * rows : (chunk + 1) * rows])
    except Exception as e:
        if isinstance(e, UserError):
            raise
        key = chunk_key(path, name, arr, chunk)
        told = location(key).failure(e)  # the storage's own account, when it failed
        if told is not None:
            raise DumpError(f"{key}: {told}") from None
        raise DumpError(f"{key} is corrupted ({type(e).__name__}: {str(e)[:120]}); "
                        "re-harvest the dump") from None


def iter_chunks(path: Path | Location, name: str, arr: Any, window: int = 16):
    """Every chunk of an array in order, `window` fetched concurrently ahead (bounded memory)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = arr.chunks[0]
    n = -(-arr.shape[0] // rows) if arr.shape[0] else 0
    with ThreadPoolExecutor(max_workers=window) as pool:
        pending = [pool.submit(read_chunk, path, name, arr, c) for c in range(min(n, window))]
        for c in range(n):
            got = pending.pop(0).result()
            if c + window < n:
                pending.append(pool.submit(read_chunk, path, name, arr, c + window))
            yield got


def _zarr_storage_dtype(activations: Any) -> str | None:
    """bfloat16 is stored as uint16 words with an attribute saying so (write_zarr)."""
    if activations.dtype == np.uint16:
        return "bfloat16" if activations.attrs.get("storage_dtype") == "bfloat16" else None
    return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(np.dtype(activations.dtype))


def open_shard(path: Path | Location, fmt: str) -> ShardArrays:
    return open_safetensors(path) if fmt == "safetensors" else open_zarr(path)


def checksum(path: Path | Location, fmt: str, done: Callable[[float], None] | None = None) -> str:
    """sha256 of a safetensors file's bytes, or of a zarr shard's decoded arrays in fixed order.

    `done`, if given, is called with the fraction of the shard hashed so far (0..1, by bytes) as
    the hashing goes, for a progress bar over a large shard.
    """
    path = location(path)
    report = done or (lambda fraction: None)
    h = hashlib.sha256()
    if fmt == "safetensors":
        with open(path, "rb") as f:
            size, read = max(1, os.fstat(f.fileno()).st_size), 0
            while block := f.read(1 << 24):
                h.update(block)
                read += len(block)
                report(read / size)
    elif path.capabilities.fetched:
        # Streamed chunk by chunk, many requests in flight; a damaged object is named.
        arrays = open_zarr(path)
        total, seen = _zarr_bytes(arrays), 0
        for name in ARRAY_NAMES:
            for chunk in iter_chunks(path, name, getattr(arrays, name)):
                block = np.ascontiguousarray(chunk)
                h.update(block.tobytes())
                seen += block.nbytes
                report(seen / total)
    else:
        arrays = open_zarr(path)
        total, seen = _zarr_bytes(arrays), 0
        for name in ("activations", "tokens", "context", "position"):
            try:
                block = np.ascontiguousarray(getattr(arrays, name)[...])
            except Exception as e:
                raise DumpError(f"{path}/{name} cannot be read ({type(e).__name__}: {e})") from None
            h.update(block.tobytes())
            seen += block.nbytes
            report(seen / total)
    return "sha256:" + h.hexdigest()


def _zarr_bytes(arrays: ShardArrays) -> int:
    """Decoded bytes of a zarr shard's four arrays (what `checksum` hashes), at least 1."""
    return max(1, sum(math.prod(getattr(arrays, n).shape) * np.dtype(getattr(arrays, n).dtype).itemsize
                      for n in ARRAY_NAMES))
