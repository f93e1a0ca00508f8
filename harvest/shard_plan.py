"""Which shards this process writes, and which forward batches that takes.

A harvest is cut into shards of `shard_rows` rows per hook, and the model runs over batches of
`batch_size` contexts on one global grid (batch b holds contexts [b x batch_size, (b+1) x
batch_size)), whatever process forms them, so every batch gives the same activations everywhere.
The shards still to do are dealt round-robin over the ranks (rank r takes the r-th, (r+N)-th, ...
of them); a single process is rank 0 of 1 and takes them all. A process forwards exactly the
batches whose rows fall in a shard it writes, and never a hook's shard already on disk.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError
from shared.process_group import Ranks


def n_shards(n_rows: int, shard_rows: int) -> int:
    """Shards of a dump of `n_rows` rows: all `shard_rows` long but the last (at least one)."""
    return max(1, -(-n_rows // shard_rows))


def check_shard_rows(shard_rows: int, batch_size: int, rows_per_context: int, where: str) -> None:
    """A harvest split over processes deals whole shards, so each must be whole forward batches
    (no batch is then formed by two ranks, and no rank forwards rows it does not keep)."""
    unit = batch_size * rows_per_context
    if shard_rows % unit:
        up = -(-shard_rows // unit) * unit
        raise UserError(f"{where}: a harvest split over processes needs --shard-rows to be a multiple "
                        f"of batch-size x rows per context = {unit} (got {shard_rows}); pass "
                        f"--shard-rows {up}")


@dataclass(frozen=True)
class ShardPlan:
    """This process's share of a harvest."""

    writes: dict[str, frozenset[int]]
    """hook -> indices of the shards this process writes for it."""
    batches: frozenset[int]
    """Global indices of the batches this process forwards: those holding a row of a shard it writes."""
    todo: int
    """Shards still to do over all processes (an index counts once, whichever hooks lack it)."""
    total: int
    """Shards of the largest hook's dump."""

    @property
    def first_batch(self) -> int:
        return min(self.batches)

    @property
    def last_batch(self) -> int:
        return max(self.batches)


def plan_shards(shard_rows: dict[str, int], done: dict[str, set[int]], n_rows: int, batch_size: int,
                rows_per_context: int, ranks: Ranks) -> ShardPlan:
    """The share of rank `ranks.rank`, given each hook's shard size and the shards already on disk.

    With several ranks every hook has the same `shard_rows` (checked when the harvest is
    prepared), so a shard index names the same rows in every hook's dump.
    """
    missing = {h: [i for i in range(n_shards(n_rows, sr)) if i not in done[h]] for h, sr in shard_rows.items()}
    todo = sorted(set().union(*missing.values()))
    mine = set(todo[ranks.rank :: ranks.world])
    writes = {h: frozenset(i for i in missing[h] if i in mine) for h in shard_rows}
    unit = batch_size * rows_per_context  # rows per forward batch
    batches: set[int] = set()
    for h, indices in writes.items():
        sr = shard_rows[h]
        for i in indices:
            first, end = i * sr, min((i + 1) * sr, n_rows)
            batches.update(range(first // unit, (end - 1) // unit + 1))
    return ShardPlan(writes, frozenset(batches), len(todo), max(n_shards(n_rows, sr) for sr in shard_rows.values()))
