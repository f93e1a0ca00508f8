"""The dump manifest: the only index of a dump's data (readers never list folders).

One `manifest.json` per hook folder. Field meanings are documented in docs/dump-format.md.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.dump_files import check_entry
from shared.errors import DumpError
from shared.manifest_check import FORMAT_VERSION, FORMATS, STORAGE_DTYPES, validate
from shared.storage import Location, location

__all__ = ["FORMAT_VERSION", "FORMATS", "MANIFEST_NAME", "SHARD_ARRAYS", "STORAGE_DTYPES", "Manifest",
           "ShardEntry", "fingerprint", "read_manifest", "shard_name"]

MANIFEST_NAME = "manifest.json"
SHARD_ARRAYS = ("activations", "tokens", "context", "position")


def shard_name(index: int, fmt: str) -> str:
    """Fixed-width shard names sort in row order: shard_000000.safetensors, ..."""
    suffix = "safetensors" if fmt == "safetensors" else "zarr"
    return f"shard_{index:06d}.{suffix}"


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ShardEntry:
    """One shard: rows [first_row, first_row + rows) of the dump.

    `sum` (per dimension), `sum_sq_norm` and `sum_norm` are float64 sums over the shard's rows, kept
    so that `stats` can be rebuilt exactly after a resume without reading old shards again.
    """

    file: str
    rows: int
    first_row: int
    checksum: str
    sum: list[float]
    sum_sq_norm: float
    sum_norm: float


@dataclass
class Manifest:
    """Everything a reader needs to interpret a dump, and everything that produced it."""

    format_version: int
    complete: bool
    format: str
    model: str
    model_fingerprint: str
    config_fingerprint: str
    hook: str
    layer: int | None
    d_in: int
    dtype: str
    context_size: int
    rows_per_context: int
    dataset: str
    split: str
    column: str
    tokenized: bool
    tokenizer: str | None
    bos_token_id: int | None
    prepend_bos: bool
    skip_bos: bool
    shard_rows: int
    n_rows: int
    n_contexts: int
    n_tokens: int
    """Tokens run through the model: n_contexts x context_size (BOS included, skipped or not)."""
    shards: list[ShardEntry]
    stats: dict[str, Any] | None
    harvest_config: dict[str, Any]
    versions: dict[str, str]
    created: str
    compression: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    pass_id: str | None = None
    """One identifier per harvest pass, the same in the manifest of every hook that pass wrote
    (and kept by --resume): dumps with equal `pass_id` hold the same tokens, contexts and rows
    in the same order, so their rows pair up one to one (input and target of a transcoder).
    None in dumps written before it existed."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: Path | str = "manifest") -> "Manifest":
        """Build from parsed JSON after checking every field (shared.manifest_check); unknown keys
        are ignored so that newer harvests stay readable."""
        validate(raw, str(where))
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["shards"] = [ShardEntry(**s) for s in raw["shards"]]
        return cls(**kwargs)

    def data_digest(self) -> str:
        """sha256 over every shard's row count and checksum, in order: what the dump holds.

        `config_fingerprint` hashes the harvest settings, so a re-harvest of an edited dataset at
        the same path keeps it; the shard checksums change with every changed byte. A run records
        this digest so that resume and evaluate can tell other data at the same path."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.rows} {s.checksum}\n".encode())
        return "sha256:" + h.hexdigest()

    def finalize_stats(self) -> None:
        """Combine per-shard sums into the dataset statistics `train` normalizes with."""
        n = sum(s.rows for s in self.shards)
        if n == 0:
            self.stats = None
            return
        total = [0.0] * self.d_in
        for s in self.shards:
            total = [a + b for a, b in zip(total, s.sum)]
        self.stats = {
            "rows": n,
            "mean": [t / n for t in total],
            "mean_sq_norm": sum(s.sum_sq_norm for s in self.shards) / n,
            "mean_norm": sum(s.sum_norm for s in self.shards) / n,
        }


def read_manifest(folder: str | Path | Location) -> Manifest:
    """Load and validate `folder/manifest.json`; a clear DumpError if it is not a dump."""
    folder = location(folder)
    path = folder / MANIFEST_NAME
    if folder.capabilities.folders:  # a symlink out of the dump, or a FIFO that would block
        check_entry(folder, path, "a file", "a JSON file")
    data = path.get_bytes()  # in object storage a missing bucket or bad keys: one line here
    if data is None:
        raise DumpError(f"{folder} holds no {MANIFEST_NAME}: it is not a dump (run `harvest` first)")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DumpError(f"{path} is not valid JSON ({e}); re-harvest the dump") from None
    return Manifest.from_dict(raw, where=path)
