"""Which rows of a dump are held out of training for evaluation: its last contexts.

Rows are stored context by context, so the last `n` contexts are the last n x rows_per_context
rows: training reads rows [0, split) and evaluation rebuilds those contexts from their token ids.
"""
from __future__ import annotations

from shared.reader import Dump

DEFAULT_FRACTION = 0.01  # 1% of the contexts ...
DEFAULT_MAX = 512  # ... but no more than this many


def holdout_contexts(n_contexts: int, requested: int | None) -> int:
    """Contexts to hold out: `requested`, or by default 1% (at least 1 when the dump has >= 2, at
    most 512), never all of them."""
    if requested is None:
        requested = 0 if n_contexts < 2 else max(1, min(DEFAULT_MAX, int(n_contexts * DEFAULT_FRACTION)))
    if not 0 <= requested < n_contexts:
        raise ValueError(f"cannot hold out {requested} of {n_contexts} contexts")
    return requested


def split_rows(dump: Dump, requested: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((train_start, train_stop), (eval_start, eval_stop)) row ranges of the dump."""
    m = dump.manifest
    n = holdout_contexts(m.n_contexts, requested)
    split = dump.n_rows - n * m.rows_per_context
    return (0, split), (split, dump.n_rows)
