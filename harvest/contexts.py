"""Pack documents into fixed-length contexts (as the seed did) and batch them ahead of the model."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from shared.errors import UserError


def too_few_tokens(have_contexts: int, n_contexts: int, context_size: int) -> UserError:
    """The dataset ran out: say how much it holds and what to ask for instead."""
    if have_contexts == 0:
        # "--tokens 0 or less" would be refused: an empty dataset needs another dataset.
        return UserError(f"the dataset holds no tokens in even one {context_size}-token context (is it "
                         "empty, whitespace only, or is --text-column the wrong column?); give a "
                         "dataset with text in it, or a smaller --context-size")
    have = have_contexts * context_size
    return UserError(f"the dataset holds only {have:,} tokens ({have_contexts:,} whole contexts), fewer "
                     f"than the {n_contexts * context_size:,} asked for; pass --tokens {have} or less, "
                     "or a larger dataset")


def pack_contexts(docs: Iterable[Sequence[int]], context_size: int, bos: int | None,
                  prepend_bos: bool) -> Iterator[np.ndarray]:
    """Concatenate documents, split into pieces, put BOS at each context start.

    Yields int64 arrays of length `context_size`. The tail shorter than a context is dropped.
    """
    body = context_size - 1 if prepend_bos else context_size
    if prepend_bos and bos is None:
        raise UserError("the model's tokenizer has no BOS token; use --no-prepend-bos")
    pieces: list[np.ndarray] = []
    held = 0
    for doc in docs:
        arr = np.asarray(doc, dtype=np.int64)
        if arr.size == 0:
            continue
        pieces.append(arr)
        held += arr.size
        if held < body:
            continue
        flat = np.concatenate(pieces)
        n_full = flat.size // body
        for i in range(n_full):
            chunk = flat[i * body : (i + 1) * body]
            yield np.concatenate(([bos], chunk)) if prepend_bos else chunk.copy()
        rest = flat[n_full * body :]
        pieces, held = ([rest], rest.size) if rest.size else ([], 0)


class BatchProducer:
    """Builds batches of contexts in a background thread so tokenization overlaps the forward.

    Yields (first_context_index, tokens [batch, context_size] int64) for contexts
    [skip, n_contexts), batched on the global grid of `batch_size` so a resumed run forms exactly
    the batches an uninterrupted run formed (forward results depend on the batch). `keep` (batch
    index -> bool), when given, selects the batches to yield (a rank's share of a harvest split
    over processes); the others are skipped without being stacked.
    """

    def __init__(self, contexts: Iterator[np.ndarray], n_contexts: int, batch_size: int,
                 context_size: int, start_batch: int = 0, prefetch_batches: int = 4,
                 keep: Callable[[int], bool] | None = None):
        self._contexts = contexts
        self._context_size = context_size
        self._n = n_contexts
        self._b = batch_size
        self._start = start_batch * batch_size
        self._keep = keep
        self._q: queue.Queue = queue.Queue(maxsize=prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harvest-tokens", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            index = 0
            batch: list[np.ndarray] = []
            for ctx in self._contexts:
                if index >= self._start and (self._keep is None or self._keep(index // self._b)):
                    batch.append(ctx)
                index += 1
                if batch and (index % self._b == 0 or index == self._n):
                    if not self._put((index - len(batch), np.stack(batch))):
                        return
                    batch = []
                if index == self._n:
                    break
            if index < self._n:
                raise too_few_tokens(index, self._n, self._context_size)
            self._put(None)
        except BaseException as e:  # hand any failure to the consumer, which re-raises it
            self._put(e)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
