"""Pack documents into fixed-length contexts (as the seed did) and batch them ahead of the model."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from shared.background import background
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


def context_batches(contexts: Iterator[np.ndarray], n_contexts: int, batch_size: int,
                    context_size: int, start_batch: int = 0,
                    keep: Callable[[int], bool] | None = None,
                    last_batch: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first_context_index, tokens [batch, context_size] int64) for the batches start_batch ..
    last_batch (default: the last) of `n_contexts` contexts, on the global grid of `batch_size`.

    The grid is global so that a resumed run, or a rank of a harvest split over processes, forms
    exactly the batches an uninterrupted single process forms (forward results depend on the
    batch). `keep` (batch index -> bool), when given, selects the batches to yield (a rank's share
    of the shards); the others are skipped without being stacked. Raises `too_few_tokens` when
    `contexts` ends before the last batch is full.
    """
    start = start_batch * batch_size
    end = n_contexts if last_batch is None else min(n_contexts, (last_batch + 1) * batch_size)
    index = 0
    batch: list[np.ndarray] = []
    for ctx in contexts:
        if index >= start and (keep is None or keep(index // batch_size)):
            batch.append(ctx)
        index += 1
        if batch and (index % batch_size == 0 or index == end):
            yield index - len(batch), np.stack(batch)
            batch = []
        if index == end:
            break
    if index < end:
        raise too_few_tokens(index, n_contexts, context_size)


def prefetched_batches(contexts: Iterator[np.ndarray], n_contexts: int, batch_size: int,
                       context_size: int, start_batch: int = 0,
                       keep: Callable[[int], bool] | None = None, last_batch: int | None = None,
                       prefetch_batches: int = 4) -> Iterator[tuple[int, np.ndarray]]:
    """`context_batches` built in a background thread, `prefetch_batches` ahead, so that
    tokenization overlaps the forward pass. Close the returned generator to stop the thread."""
    return background(context_batches(contexts, n_contexts, batch_size, context_size, start_batch, keep,
                                      last_batch),
                      maxsize=prefetch_batches, name="harvest-tokens")
