"""The one background-thread helper both stages use, and harvest's batches built on it."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from harvest.contexts import prefetched_batches
from shared.background import background
from shared.errors import UserError


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_items_arrive_in_order_and_the_thread_ends():
    assert list(background(iter(range(50)), maxsize=3, name="bg-order")) == list(range(50))
    assert not _threads("bg-order")


def test_a_producer_error_reraises_in_the_consumer():
    def failing():
        yield 1
        raise ValueError("producer broke")

    got = background(failing(), maxsize=2, name="bg-error")
    assert next(got) == 1
    with pytest.raises(ValueError, match="producer broke"):
        next(got)


def test_closing_early_stops_and_joins_the_producer():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    got = background(endless(), maxsize=2, name="bg-close")
    assert [next(got) for _ in range(5)] == [0, 1, 2, 3, 4]
    got.close()
    assert closed.is_set() and not _threads("bg-close")


def _contexts(n: int, size: int):
    return (np.full(size, i, dtype=np.int64) for i in range(n))


def test_batches_follow_the_global_grid():
    # 10 contexts in batches of 4: batch 0 = contexts 0-3, 1 = 4-7, 2 = 8-9 (short).
    got = list(prefetched_batches(_contexts(10, 3), 10, 4, 3, start_batch=1))
    assert [first for first, _ in got] == [4, 8]
    assert [toks[:, 0].tolist() for _, toks in got] == [[4, 5, 6, 7], [8, 9]]
    kept = list(prefetched_batches(_contexts(10, 3), 10, 4, 3, keep=lambda b: b != 1))
    assert [first for first, _ in kept] == [0, 8]


def test_running_out_of_contexts_is_one_user_error():
    with pytest.raises(UserError, match="holds only 15 tokens"):
        list(prefetched_batches(_contexts(5, 3), 10, 4, 3))


def test_the_stream_ends_at_the_last_batch_asked_for():
    # A rank whose last shard ends at batch 1 reads no further: a dataset shorter than the whole
    # harvest is the problem of the rank that needs the missing contexts.
    got = list(prefetched_batches(_contexts(8, 3), 10, 4, 3, last_batch=1))
    assert [first for first, _ in got] == [0, 4]
    with pytest.raises(UserError, match="holds only 15 tokens"):
        list(prefetched_batches(_contexts(5, 3), 10, 4, 3, last_batch=1))
