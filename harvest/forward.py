"""The harvest's inner loop: forward each batch of contexts to the deepest hook and hand every
hook's rows to its writer (one process, or one rank's shards under torchrun)."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from harvest.target import human_bytes


def row_columns(tokens: np.ndarray, first_context: int, skip_bos: bool) -> tuple[np.ndarray, ...]:
    """tokens / context / position for each row of a batch [batch, context_size]."""
    start = 1 if skip_bos else 0
    body = tokens[:, start:]
    b, t = body.shape
    return (body.reshape(-1).astype(np.int32),
            np.repeat(np.arange(first_context, first_context + b, dtype=np.int64), t),
            np.tile(np.arange(start, start + t, dtype=np.int32), b))


def dump_progress(writers: Iterable[Any]) -> str:
    """The harvest bar's text: bytes of activations taken so far (buffered or written), and how
    many of them are on disk. Both count as the rows arrive, where on-disk bytes alone would read
    0 for the whole of a dump that is one shard, written only at the end."""
    taken = written = 0
    for w in writers:
        taken, written = taken + w.bytes_taken, written + w.bytes_written
    return f"{human_bytes(taken)} of activations ({human_bytes(written)} on disk)"


def forward_into(model: Any, batches: Iterable[tuple[int, np.ndarray]], writers: dict[str, Any],
                 widths: dict[str, int], *, stop: int | None, device: str, skip_bos: bool,
                 rows_per_context: int, storage: torch.dtype, bar: Any) -> int:
    """Run `model` over each (first context, tokens [batch, context_size]) of `batches`, to layer
    `stop` only, and give each hook's rows (BOS dropped with `skip_bos`, cast to the storage dtype)
    to `writers[hook].add`. Returns the tokens run through the model. The bar counts tokens; its
    text says how much of the dump exists so far (`dump_progress`)."""
    hooks = list(writers)
    done = 0
    with torch.inference_mode():
        for first_ctx, toks in batches:
            batch = torch.from_numpy(toks).to(device, non_blocking=True)
            _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop,
                                            return_cache_object=False)
            cols = row_columns(toks, first_ctx, skip_bos)
            for h in hooks:
                acts = cache[h][:, 1:] if skip_bos else cache[h]
                writers[h].add(first_ctx * rows_per_context, acts.reshape(-1, widths[h]).to(storage), *cols)
            bar.update(toks.size)
            done += toks.size
            bar.set_postfix_str(dump_progress(writers.values()), refresh=False)
    return done
