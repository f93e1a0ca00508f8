"""The seed's `ActivationsStore`: the batches a training run reads, one at a time or as an iterator.

`LMSparseAutoencoderSessionloader` returns one: `store.next_batch()` is the next training batch,
[train_batch_size, d_in] float32 on the run's device, and `for batch in store` (or `iter(store)`,
`next(store)`) continues the same stream. The stream is the one training read, batch for batch:
the same rows (the dump's held-out contexts left out), the same seed, shuffle buffer and blocks.
The activations are as the dump stores them, before any `normalize_activations` scaling (a saved
SAE reads raw activations: the scaling is folded into its weights). The stream runs epoch after
epoch and never ends by itself (`itertools.islice(store, n)` takes n batches).

The shuffling and reading are `train.loader.ActivationLoader`'s, wrapped as it is (`store.loader`;
its other attributes read through the store, as when sessions returned the loader itself).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from shared.reader import Dump
from train.holdout import split_rows
from train.loader import ActivationLoader


class ActivationsStore:
    """Training batches from a dump, in training's order (see the module docstring)."""

    def __init__(self, loader: ActivationLoader) -> None:
        self.loader = loader
        self._stream: Iterator[torch.Tensor] | None = None

    @classmethod
    def for_run(cls, dump: Dump, settings: dict[str, Any], device: str | torch.device) -> "ActivationsStore":
        """The store of a run with these flat settings (a training config's `to_dict()`, or a
        checkpoint's cfg.json, whose `train_rows` are the rows it trained on)."""
        rows = settings.get("train_rows")
        if rows is None:
            rows, _ = split_rows(dump, settings.get("eval_holdout_contexts"))
        loader = ActivationLoader(dump, int(settings.get("train_batch_size") or 4096), int(settings.get("seed", 42)),
                                  device, rows=(int(rows[0]), int(rows[1])),
                                  buffer_rows=settings.get("shuffle_buffer_rows"),
                                  block_rows=int(settings.get("shuffle_block_rows") or 16))
        return cls(loader)

    @property
    def dump(self) -> Dump:
        return self.loader.dump

    @property
    def d_in(self) -> int:
        return self.loader.dump.d_in

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def next_batch(self) -> torch.Tensor:
        """The next training batch: [batch_size, d_in] float32 on the device (the last batch of an
        epoch is shorter when the rows are not a whole number of batches)."""
        if self._stream is None:
            self._stream = self.loader.batches()
        return next(self._stream)

    def __iter__(self) -> "ActivationsStore":
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def batches(self, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """A fresh stream from global batch `start_batch` (what the loader returned before)."""
        return self.loader.batches(start_batch)

    def __getattr__(self, name: str) -> Any:
        """The wrapped loader's other attributes (`n_rows`, `gather`...): sessions returned the
        loader itself before, and code written then keeps working."""
        if name == "loader":  # not set yet (a copy being built): no loader to ask
            raise AttributeError(name)
        return getattr(self.loader, name)
