"""The one harvest driver's plan (which shards a process writes, which batches it forwards) and the
one shard writer, which writes only the shards it is given."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from harvest.ledger import ManifestLedger
from harvest.shard_plan import plan_shards
from harvest.writer import ShardWriter
from shared.dump_writer import write_dump
from shared.manifest import ShardEntry
from shared.process_group import Ranks

# 40 contexts of 8 rows in batches of 4 contexts: 32 rows per batch, 10 batches, 320 rows.
N_ROWS, BATCH, RPC = 320, 4, 8


def test_one_process_takes_every_missing_shard_of_each_hook():
    plan = plan_shards({"a": 64, "b": 64}, {"a": set(), "b": set()}, N_ROWS, BATCH, RPC, Ranks())
    assert plan.writes == {"a": frozenset(range(5)), "b": frozenset(range(5))}
    assert plan.batches == frozenset(range(10)) and (plan.todo, plan.total) == (5, 5)


def test_a_resume_starts_at_the_hook_furthest_behind():
    # Shards of 100 rows (not whole batches: a single process allows that); a has 2 done, b 1.
    plan = plan_shards({"a": 100, "b": 100}, {"a": {0, 1}, "b": {0}}, N_ROWS, BATCH, RPC, Ranks())
    assert plan.writes == {"a": frozenset({2, 3}), "b": frozenset({1, 2, 3})}
    assert plan.first_batch == 100 // 32 and plan.last_batch == 9  # the batch holding row 100 onwards
    assert plan.batches == frozenset(range(3, 10))


def test_ranks_take_the_shards_to_do_round_robin():
    done = {"a": {1}, "b": {1}}
    got = [plan_shards({"a": 64, "b": 64}, done, N_ROWS, BATCH, RPC, Ranks(r, 2)) for r in (0, 1)]
    assert [p.writes["a"] for p in got] == [frozenset({0, 3}), frozenset({2, 4})]
    assert got[0].batches == frozenset({0, 1, 6, 7}) and got[1].batches == frozenset({4, 5, 8, 9})
    assert got[0].todo == got[1].todo == 4


def test_a_shard_one_hook_has_is_written_for_the_other_only():
    plan = plan_shards({"a": 64, "b": 64}, {"a": {0, 1, 2, 3, 4}, "b": {0, 1, 3, 4}}, N_ROWS, BATCH, RPC,
                       Ranks())
    assert plan.writes == {"a": frozenset(), "b": frozenset({2})}
    assert plan.batches == frozenset({4, 5})


def test_nothing_left_means_no_batches():
    plan = plan_shards({"a": 64}, {"a": set(range(5))}, N_ROWS, BATCH, RPC, Ranks())
    assert plan.writes == {"a": frozenset()} and plan.batches == frozenset() and plan.todo == 0


class _Recorded(ManifestLedger):
    """The manifest ledger, also remembering which shards it was told about."""

    def __init__(self, folder: Path, manifest):
        super().__init__(folder, manifest)
        self.indices: list[int] = []

    def record(self, index: int, entry: ShardEntry) -> None:
        self.indices.append(index)
        super().record(index, entry)


def _fresh_writer(tmp_path: Path, writes: frozenset[int]):
    acts = torch.randn(N_ROWS, 6)
    ref = write_dump(tmp_path / "ref", acts, context_size=RPC, shard_rows=100)
    m = copy.deepcopy(ref)
    m.shards, m.complete, m.stats, m.n_rows = [], False, None, 0
    (tmp_path / "out").mkdir()
    ledger = _Recorded(tmp_path / "out", m)
    return acts, ref, ShardWriter(tmp_path / "out", m, N_ROWS, writes, ledger, pin_memory=False), ledger


def _feed(writer: ShardWriter, acts: torch.Tensor, batches: range) -> None:
    for b in batches:
        rows = slice(b * BATCH * RPC, (b + 1) * BATCH * RPC)
        n = acts[rows].shape[0]
        first = b * BATCH * RPC
        writer.add(first, acts[rows], np.zeros(n, np.int32), np.arange(first, first + n) // RPC,
                   np.arange(first, first + n, dtype=np.int32) % RPC)


def test_the_writer_writes_only_its_shards_and_records_each(tmp_path):
    acts, ref, writer, ledger = _fresh_writer(tmp_path, frozenset({0, 1, 2, 3}))
    _feed(writer, acts, range(10))
    writer.finish()
    assert ledger.indices == [0, 1, 2, 3]
    assert [s.rows for s in ledger.manifest.shards] == [100, 100, 100, 20]
    for got, want in zip(ledger.manifest.shards, ref.shards):
        assert got.checksum == want.checksum  # the same bytes write_dump wrote (tokens are zeros in both)


def test_rows_of_shards_done_before_are_dropped(tmp_path):
    acts, ref, writer, ledger = _fresh_writer(tmp_path, frozenset({2, 3}))
    ledger.manifest.shards = list(ref.shards[:2])  # shards 0 and 1 are on disk already
    _feed(writer, acts, range(6, 10))  # the batches from the one holding row 200 on
    writer.finish()
    assert ledger.indices == [2, 3] and [s.checksum for s in ledger.manifest.shards] == [s.checksum for s in ref.shards]
    assert not (tmp_path / "out" / "shard_000000.safetensors").exists()


def test_a_shard_left_half_filled_is_an_error_not_a_short_shard(tmp_path):
    acts, _, writer, ledger = _fresh_writer(tmp_path, frozenset({0, 1, 2, 3}))
    _feed(writer, acts, range(5))  # stops inside shard 1
    with pytest.raises(RuntimeError, match="shard 1 got only 60 rows"):
        writer.finish()
    assert ledger.indices == [0]
