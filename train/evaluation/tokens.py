"""Rebuild the token grid harvest fed the model, from the dump's stored rows."""
from __future__ import annotations

import numpy as np
import torch

from shared.errors import DumpError, UserError
from shared.reader import Dump


def context_tokens(dump: Dump, first_context: int, n_contexts: int) -> torch.Tensor:
    """Token ids of contexts [first_context, first_context + n_contexts): [n, context_size] int64.

    Rows are stored context by context, `rows_per_context` each, so the contexts' rows are one
    contiguous range. With `skip_bos` position 0 is not stored: it was the BOS token (harvest only
    skips it when it prepended one), so it is filled with `bos_token_id`.
    """
    m = dump.manifest
    if n_contexts < 1 or first_context < 0 or first_context + n_contexts > m.n_contexts:
        raise UserError(f"contexts [{first_context}, {first_context + n_contexts}) are outside the "
                        f"dump's {m.n_contexts} contexts ({dump.path})")
    first_pos = 1 if m.skip_bos else 0
    if m.rows_per_context != m.context_size - first_pos:
        raise DumpError(f"{dump.path}: {m.rows_per_context} rows per context do not cover "
                        f"{m.context_size}-token contexts; cannot rebuild its tokens")
    if m.skip_bos and m.bos_token_id is None:
        raise DumpError(f"{dump.path} skips BOS but records no bos_token_id; cannot rebuild its tokens")
    start, stop = first_context * m.rows_per_context, (first_context + n_contexts) * m.rows_per_context
    tokens = dump.column("tokens", start, stop).astype(np.int64)  # [rows]
    context = dump.column("context", start, stop).astype(np.int64)
    position = dump.column("position", start, stop).astype(np.int64)
    want_context = np.repeat(np.arange(first_context, first_context + n_contexts), m.rows_per_context)
    want_position = np.tile(np.arange(first_pos, m.context_size), n_contexts)
    if not (np.array_equal(context, want_context) and np.array_equal(position, want_position)):
        raise DumpError(f"{dump.path}: rows [{start}, {stop}) are not stored context by context; "
                        "re-harvest the dump")
    grid = np.empty((n_contexts, m.context_size), dtype=np.int64)
    grid[:, first_pos:] = tokens.reshape(n_contexts, m.rows_per_context)
    if m.skip_bos:
        grid[:, 0] = m.bos_token_id
    return torch.from_numpy(grid)
