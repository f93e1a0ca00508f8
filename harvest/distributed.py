"""Several processes, one dump: `torchrun --nproc-per-node N -m harvest ...` (multi-node alike).

torch.distributed, env:// rendezvous (the variables torchrun sets), gloo on CPU, nccl on CUDA; each
rank runs on its own device (cuda:LOCAL_RANK when CUDA is there).

Work is split in whole shards, round-robin over the shards still to do: rank r takes the r-th,
(r+N)-th, ... A shard is a whole number of forward batches (shard_rows a multiple of batch_size x
rows_per_context), so every rank forms exactly the batches a single process forms, on the same
global grid, and writes exactly the same shard files. Each finished shard's manifest entry
(checksum, float64 sums) goes to its own small file in `.harvest-shards/`; after a barrier rank 0
gathers them in shard order into manifest.json, computes the statistics as a single process does,
marks the dump complete and deletes that folder. The dump is then byte-for-byte the dump of a
single process with the same settings, whatever N.

A rank that dies leaves every shard it finished (file + entry); `--resume` (with any N, or a
single process) redoes only the shards without both.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared import atomic
from shared.errors import UserError
from shared.manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest
from shared.process_group import Ranks, barrier
from shared.storage import RemotePath, delete_prefix, get_bytes, is_remote, list_names, list_names_limited, location

PROGRESS = ".harvest-shards"  # inside a dump being harvested shard by shard: one entry file per shard
_TIMEOUT = dt.timedelta(hours=12)  # ranks wait at barriers for the slowest one (imbalance: a shard)


# ---- shards ------------------------------------------------------------------------------------
def batch_unit(batch_size: int, rows_per_context: int) -> int:
    """Rows in one forward batch: shards of a shard-by-shard harvest are whole numbers of them."""
    return batch_size * rows_per_context


def check_shard_rows(shard_rows: int, batch_size: int, rows_per_context: int, where: str) -> None:
    unit = batch_unit(batch_size, rows_per_context)
    if shard_rows % unit:
        up = -(-shard_rows // unit) * unit
        raise UserError(f"{where}: a harvest split over processes needs --shard-rows to be a multiple "
                        f"of batch-size x rows per context = {unit} (got {shard_rows}); pass "
                        f"--shard-rows {up}")


def n_shards(n_rows: int, shard_rows: int) -> int:
    return max(1, -(-n_rows // shard_rows))


def progress_folder(folder: Path | RemotePath) -> Path | RemotePath:
    return location(folder) / PROGRESS


def entry_path(folder: Path | RemotePath, index: int) -> Path | RemotePath:
    return progress_folder(folder) / f"{index:06d}.json"


def has_progress(folder: Path | RemotePath) -> bool:
    """Whether a harvest split over processes began in `folder` (its shard entries are there)."""
    progress = progress_folder(folder)
    return bool(list_names_limited(progress)) if is_remote(progress) else progress.is_dir()


def _entry_texts(folder: Path | RemotePath) -> list[bytes]:
    progress = progress_folder(folder)
    if is_remote(progress):
        return [b for b in (get_bytes(progress / n) for n in sorted(list_names(progress)) if n.endswith(".json"))
                if b is not None]
    return [p.read_bytes() for p in sorted(progress.glob("*.json"))] if progress.is_dir() else []


def _shard_exists(folder: Path | RemotePath, name: str) -> bool:
    where = location(folder) / name
    return bool(list_names_limited(where)) if is_remote(where) else where.exists()


def finished_shards(folder: Path | RemotePath, m: Manifest) -> dict[int, ShardEntry]:
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


class RankShardWriter:
    """Collects one hook's rows of this rank's shards, in order, and writes each shard whole."""

    def __init__(self, folder: Path | RemotePath, manifest: Manifest, n_rows: int):
        self.folder = location(folder)
        self.manifest = manifest
        self.n_rows = n_rows
        self.bytes_written = 0
        self._index: int | None = None
        self._parts: list[tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]] = []
        self._fill = 0

    def _size(self, index: int) -> int:
        sr = self.manifest.shard_rows
        return min(sr, self.n_rows - index * sr)

    def add(self, first_row: int, acts: torch.Tensor, tokens: np.ndarray, context: np.ndarray,
            position: np.ndarray) -> None:
        index = first_row // self.manifest.shard_rows
        if self._index is None:
            self._index = index
        assert index == self._index and first_row == index * self.manifest.shard_rows + self._fill
        self._parts.append((acts.cpu(), tokens, context, position))
        self._fill += acts.shape[0]
        if self._fill == self._size(index):
            self._write()

    def _write(self) -> None:
        from harvest.writer import NonFiniteActivations, first_non_finite
        from shared.dump_writer import shard_stats, write_shard
        from shared.manifest import shard_name

        m, index = self.manifest, self._index
        assert index is not None
        acts = torch.cat([p[0] for p in self._parts])
        tokens, context, position = (np.concatenate([p[i] for p in self._parts]) for i in (1, 2, 3))
        self._parts, self._fill, self._index = [], 0, None
        first_row = index * m.shard_rows
        stats = shard_stats(acts)
        if not np.isfinite(stats[1]):
            bad = first_non_finite(acts)
            if bad is not None:
                raise NonFiniteActivations(
                    f"non-finite activation in {shard_name(index, m.format)} at row {bad} (dump row "
                    f"{first_row + bad}, context {context[bad]}, position {position[bad]}); try "
                    "--model-dtype float32 or check the model")
        entry = write_shard(self.folder, m, index, first_row, acts, tokens, context, position, stats=stats)
        atomic.write_json(entry_path(self.folder, index), asdict(entry))
        self.bytes_written += acts.numel() * acts.element_size() + len(tokens) * 16

    def pending(self) -> bool:
        return bool(self._parts)


def complete_dump(folder: Path, m: Manifest, n_rows: int) -> None:
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
    progress = progress_folder(folder)
    if is_remote(progress):
        delete_prefix(progress)
    else:
        shutil.rmtree(progress, ignore_errors=True)


def run_by_shards(cfg: Any, ranks: Ranks, model: Any, source: Any, manifests: dict[str, Manifest],
                  folders: dict[str, Path], stop: int | None, device: str, progress: bool,
                  log: Callable[[str], None]) -> tuple[int, float]:
    """Harvest this rank's share of the shards still missing, then (rank 0) complete the dumps.

    `manifests`: the hooks still to do, the same on every rank (rank 0 wrote them to disk).
    Returns (tokens this rank ran through the model, seconds).
    """
    from tqdm import tqdm

    from harvest.contexts import pack_contexts, prefetched_batches
    from harvest.data import iter_token_docs
    from harvest.forward import forward_into
    from shared.models import bos_token_id
    from shared.shard_files import TORCH_DTYPE

    rpc, bsz = cfg.rows_per_context, cfg.batch_size
    n_rows = cfg.n_contexts * rpc
    hooks = list(manifests)
    shard_rows = manifests[hooks[0]].shard_rows
    unit = batch_unit(bsz, rpc)
    done_all = set.intersection(*(set(finished_shards(folders[h], manifests[h])) for h in hooks))
    todo = [i for i in range(n_shards(n_rows, shard_rows)) if i not in done_all]
    mine = set(todo[ranks.rank :: ranks.world])
    if ranks.lead:
        log(f"{len(todo)} of {n_shards(n_rows, shard_rows)} shards to harvest, over {ranks.world} "
            f"process(es); rank 0 takes {len(mine)}")
    batches_per_shard = shard_rows // unit
    writers = {h: RankShardWriter(folders[h], manifests[h], n_rows) for h in hooks}
    storage = TORCH_DTYPE[cfg.dtype]
    done = 0
    start = time.perf_counter()
    if mine:
        first_batch = min(mine) * batches_per_shard
        last_batch = min(-(-cfg.n_contexts // bsz), (max(mine) + 1) * batches_per_shard) - 1
        docs = iter_token_docs(source, getattr(model, "tokenizer", None))
        contexts = pack_contexts(docs, cfg.context_size, bos_token_id(model), cfg.prepend_bos)
        producer = prefetched_batches(contexts, cfg.n_contexts, bsz, cfg.context_size, first_batch,
                                      keep=lambda b: b // batches_per_shard in mine)
        my_tokens = sum(min(shard_rows, n_rows - i * shard_rows) // rpc for i in mine) * cfg.context_size
        bar = tqdm(total=my_tokens, unit="tok", unit_scale=True, disable=not (progress and ranks.lead),
                   desc="harvest" + (f" (rank 0 of {ranks.world})" if ranks.active else ""), smoothing=0.1)
        try:
            done = forward_into(model, producer, writers, {h: manifests[h].d_in for h in hooks}, stop=stop,
                                device=device, skip_bos=cfg.skip_bos, rows_per_context=rpc, storage=storage,
                                bar=bar, until_context=last_batch * bsz)
        finally:
            producer.close()
            bar.close()
        assert not any(w.pending() for w in writers.values())
    seconds = time.perf_counter() - start
    barrier(ranks)
    if ranks.lead:
        for h in hooks:
            complete_dump(folders[h], manifests[h], n_rows)
    barrier(ranks)
    return done, seconds


def prepare_rank_folder(folder: Path | RemotePath) -> None:
    """Rank 0, after writing the manifest: the folder for the shard entries (object storage has
    no folders: the entries' keys share a prefix)."""
    progress = progress_folder(folder)
    if not is_remote(progress):
        progress.mkdir(parents=True, exist_ok=True)


def read_prepared(folder: Path) -> Manifest:
    """Ranks other than 0: the manifest rank 0 prepared."""
    return read_manifest(folder)
