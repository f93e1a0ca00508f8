"""The training loader: exact epochs, determinism, resume, and well-mixed batches."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from shared.dump_writer import write_dump
from shared.reader import open_dump
from train.loader import ActivationLoader


def _row_id_dump(tmp_path, n_contexts=64, context_size=32, shard_rows=700):
    """A dump whose row r holds the value r in every dimension, so batches reveal their rows."""
    n = n_contexts * context_size
    acts = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4)
    write_dump(tmp_path / "d", acts, context_size=context_size, shard_rows=shard_rows)
    return open_dump(tmp_path / "d")


def _ids(batch: torch.Tensor) -> np.ndarray:
    return batch[:, 0].long().numpy()


def test_each_epoch_visits_every_row_once(tmp_path):
    dump = _row_id_dump(tmp_path)
    loader = ActivationLoader(dump, batch_size=100, seed=3, buffer_rows=500, block_rows=8)
    bpe = loader.batches_per_epoch
    assert bpe == 21  # 2048 rows: 20 full batches and one of 48
    batches = list(itertools.islice(loader.batches(), 2 * bpe))
    sizes = [len(b) for b in batches[:bpe]]
    assert sizes == [100] * 20 + [48]
    for epoch in range(2):
        ids = np.concatenate([_ids(b) for b in batches[epoch * bpe : (epoch + 1) * bpe]])
        assert np.array_equal(np.sort(ids), np.arange(dump.n_rows))
    assert not np.array_equal(_ids(batches[0]), _ids(batches[bpe]))  # a new order each epoch


def test_order_is_a_pure_function_of_seed_and_epoch(tmp_path):
    dump = _row_id_dump(tmp_path)
    make = lambda seed: ActivationLoader(dump, batch_size=64, seed=seed, buffer_rows=512, block_rows=8)
    a = [_ids(b) for b in itertools.islice(make(1).batches(), 70)]
    b = [_ids(b) for b in itertools.islice(make(1).batches(), 70)]
    c = [_ids(b) for b in itertools.islice(make(2).batches(), 70)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # Resuming at batch k gives exactly batches k, k+1, ... (across buffer and epoch boundaries).
    for k in (1, 8, 31, 33, 45):
        resumed = [_ids(x) for x in itertools.islice(make(1).batches(start_batch=k), 70 - k)]
        assert all(np.array_equal(x, y) for x, y in zip(a[k:], resumed))


def test_row_range_restricts_rows(tmp_path):
    dump = _row_id_dump(tmp_path)
    loader = ActivationLoader(dump, batch_size=50, seed=0, rows=(0, 1600), buffer_rows=400)
    ids = np.concatenate([_ids(b) for b in itertools.islice(loader.batches(), loader.batches_per_epoch)])
    assert np.array_equal(np.sort(ids), np.arange(1600))


def test_batches_come_from_nearly_as_many_contexts_as_rows(tmp_path):
    # 32768 contexts of 128 tokens and a buffer holding a quarter of them: a 4096-row batch should
    # hold ~4096 distinct contexts (a sliding buffer fed in dump order gives a few hundred).
    n_ctx, ctx = 32768, 128
    acts = torch.arange(n_ctx * ctx, dtype=torch.float32)[:, None]
    write_dump(tmp_path / "d", acts, context_size=ctx, shard_rows=1 << 20)
    dump = open_dump(tmp_path / "d")
    loader = ActivationLoader(dump, batch_size=4096, seed=0, block_rows=16, buffer_rows=1 << 20)
    for batch in itertools.islice(loader.batches(), 3):
        assert len(np.unique(_ids(batch) // ctx)) > 0.9 * 4096


def test_bfloat16_dump_is_served_as_float32(tmp_path):
    acts = torch.randn(256, 8).to(torch.bfloat16)
    write_dump(tmp_path / "d", acts, context_size=32, shard_rows=100)
    loader = ActivationLoader(open_dump(tmp_path / "d"), batch_size=256, seed=0)
    batch = next(loader.batches())
    assert batch.dtype == torch.float32
    assert torch.equal(torch.sort(batch[:, 0]).values, torch.sort(acts[:, 0].float()).values)


def test_data_parallel_shares_are_the_global_batches_read_once(tmp_path):
    """Each rank gets rows [r*n//w, (r+1)*n//w) of every global batch (the short last one of an
    epoch included), reads only those rows, and resumes at any batch like the whole loader."""
    dump = _row_id_dump(tmp_path)
    whole = ActivationLoader(dump, batch_size=100, seed=5, buffer_rows=500, block_rows=8)
    n = 2 * whole.batches_per_epoch + 3
    want = [_ids(b) for b in itertools.islice(whole.batches(), n)]
    for world in (2, 3):
        ranks = [ActivationLoader(dump, batch_size=100, seed=5, buffer_rows=500, block_rows=8, share=(r, world))
                 for r in range(world)]
        got = [[_ids(b) for b in itertools.islice(rank.batches(), n)] for rank in ranks]
        for i in range(n):
            assert whole.batch_rows(i) == len(want[i])
            assert np.array_equal(np.concatenate([g[i] for g in got]), want[i])
            assert [len(g[i]) for g in got] == [ranks[r].share_of(len(want[i]))[1] - ranks[r].share_of(len(want[i]))[0]
                                                for r in range(world)]
        # Every row of a buffer is read by exactly one rank (no background read-ahead here).
        for k, parts in enumerate(zip(*(itertools.islice(rank._buffers(0), 6) for rank in ranks))):
            read = np.concatenate([data[:, 0] for data, _ in parts])
            assert np.array_equal(np.sort(read), np.sort(next(itertools.islice(whole._buffers(0), k, None))[0][:, 0]))
        resumed = ActivationLoader(dump, batch_size=100, seed=5, buffer_rows=500, block_rows=8, share=(1, world))
        assert all(np.array_equal(_ids(b), g) for b, g in zip(itertools.islice(resumed.batches(start_batch=17), 9),
                                                               got[1][17:26]))
