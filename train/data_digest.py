"""Whether a dump still holds the data a run was trained on.

A run records its dump's path and `config_fingerprint` (a hash of the harvest settings), which a
re-harvest of an edited dataset at the same path keeps. It also records `data_digest`
(`Manifest.data_digest`: a hash of every shard's checksum), which changes with any changed row.
Run folders written before the digest existed have none: for them only the older comparison
(fingerprint, hook, width, split) applies.
"""
from __future__ import annotations

from typing import Any

from shared.errors import UserError
from shared.reader import Dump

DIGEST_KEY = "data_digest"


def check_same_data(recorded: dict[str, Any], dump: Dump, trained: str, fix: str) -> None:
    """A one-line UserError if `recorded` (a dump identity: trainer_state.json's `dump`, its
    `target`, or cfg.json) has a digest and `dump` holds other data; `trained` names what was
    trained on it ("the run in X"), `fix` says what to do."""
    saved = recorded.get(DIGEST_KEY)
    if saved is None:  # written before the digest existed
        return
    if saved != dump.manifest.data_digest():
        raise UserError(f"the dump at {dump.path} now holds other data than {trained} was trained on "
                        f"(shard checksums differ): {fix}")
