"""Where a harvest records each shard it finished, and how the dump is completed from that record.

The manifest is the only index a reader uses, so a shard counts once its entry (checksum, float64
sums) is recorded after the shard is durable:

- in the manifest itself (`ManifestLedger`) when one process writes a dump's shards in order: the
  manifest is rewritten after each shard, and an interrupted dump resumes after its last entry;
- in a small file of its own in `.harvest-shards/` beside the dump (`EntryLedger`) when shards are
  written by several ranks in any order (torchrun, or a resume of a dump begun so). A rank that
  dies leaves every shard it finished (file + entry); a resume, with any number of ranks, redoes
  only the shards without both.

At the end rank 0 gathers the manifest's entries and the entry files in shard order into
manifest.json, computes the statistics, marks the dump complete and deletes `.harvest-shards/`:
the same manifest whichever way the shards were recorded, so a dump is byte-for-byte the dump of a
single process with the same settings, whatever the number of ranks.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Protocol

from harvest.shard_plan import n_shards
from shared import atomic
from shared.errors import UserError
from shared.manifest import MANIFEST_NAME, Manifest, ShardEntry
from shared.storage import Location, location

PROGRESS = ".harvest-shards"  # inside a dump being harvested shard by shard: one entry file per shard


class Ledger(Protocol):
    def record(self, index: int, entry: ShardEntry) -> None:
        """Shard `index` is durable: make it count."""


class ManifestLedger:
    """One process writing a dump's shards in order: each entry joins the manifest, rewritten."""

    def __init__(self, folder: Location, manifest: Manifest):
        self.folder = location(folder)
        self.manifest = manifest

    def record(self, index: int, entry: ShardEntry) -> None:
        # The manifest lists a prefix of the shards: a gap would make it lie about the rows.
        assert index == len(self.manifest.shards), (index, len(self.manifest.shards))
        self.manifest.shards.append(entry)
        atomic.write_json(self.folder / MANIFEST_NAME, self.manifest.to_dict())


class EntryLedger:
    """Shards written in any order (by any rank): each entry in its own file in `.harvest-shards/`."""

    def __init__(self, folder: Location):
        self.folder = location(folder)

    def record(self, index: int, entry: ShardEntry) -> None:
        atomic.write_json(entry_path(self.folder, index), asdict(entry))


def progress_folder(folder: Location) -> Location:
    return location(folder) / PROGRESS


def entry_path(folder: Location, index: int) -> Location:
    return progress_folder(folder) / f"{index:06d}.json"


def has_progress(folder: Location) -> bool:
    """Whether a harvest split over processes began in `folder` (its shard entries are there)."""
    return progress_folder(folder).exists()


def prepare_rank_folder(folder: Location) -> None:
    """Rank 0, after writing the manifest: the folder for the shard entries (object storage has
    no folders: the entries' keys share a prefix)."""
    progress_folder(folder).ensure_folder()


def _entry_texts(folder: Location) -> list[bytes]:
    progress = progress_folder(folder)
    names = [n for n in progress.list_names() if n.endswith(".json") and "/" not in n]
    return [b for b in ((progress / n).get_bytes() for n in names) if b is not None]


def _shard_exists(folder: Location, name: str) -> bool:
    return (location(folder) / name).exists()


def finished_shards(folder: Location, m: Manifest) -> dict[int, ShardEntry]:
    """Shards already written with their entries: the manifest's (a single process's prefix) and
    the entry files of ranks, each only while its shard is there."""
    done = {s.first_row // m.shard_rows: s for s in m.shards}
    for text in _entry_texts(folder):
        try:
            entry = ShardEntry(**json.loads(text))
        except (ValueError, TypeError):
            continue  # unreadable: the shard is done again
        if _shard_exists(folder, entry.file):
            done.setdefault(entry.first_row // m.shard_rows, entry)
    return done


def complete_dump(folder: Location, m: Manifest, n_rows: int) -> None:
    """Rank 0, after every rank finished: the manifest indexes every shard, in shard order."""
    done = finished_shards(folder, m)
    want = n_shards(n_rows, m.shard_rows)
    missing = [i for i in range(want) if i not in done]
    if missing:
        raise UserError(f"{folder}: shards {missing[:5]} were not written; rerun the same command "
                        "with --resume")
    m.shards = [done[i] for i in range(want)]
    m.n_rows = sum(s.rows for s in m.shards)
    m.finalize_stats()
    m.complete = True
    atomic.write_json(location(folder) / MANIFEST_NAME, m.to_dict())
    progress_folder(folder).delete()
