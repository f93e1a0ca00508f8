"""The pass identifier: one per harvest invocation, shared by the manifest of every hook it writes.

Dumps with equal `pass_id` come from one pass over the same contexts, so their rows pair up one to
one (the input and target of a transcoder, say). A resume continues the pass it resumes and keeps
its identifier; rank 0 picks it and the other ranks read it from the manifests rank 0 wrote.
"""
from __future__ import annotations

import uuid

from shared.errors import UserError
from shared.manifest import Manifest


def new_pass_id() -> str:
    """A fresh identifier: 32 hex digits of a random UUID (RFC 4122 version 4)."""
    return uuid.uuid4().hex


def pass_id_for(resumed: dict[str, Manifest]) -> str:
    """The identifier of this pass, given the interrupted manifests it continues (hook -> manifest).

    Nothing resumed: a fresh one. Resumed dumps carrying one identifier: that one, for every hook
    of the pass (hooks started afresh, and resumed dumps written before `pass_id` existed, adopt
    it: their settings fingerprint matches, so their rows are the same rows). Only dumps written
    before `pass_id` existed: a fresh one for all. Two different identifiers mean dumps begun by
    different harvests: refused, rather than pretending they were one pass.
    """
    ids = {h: m.pass_id for h, m in resumed.items() if m.pass_id is not None}
    distinct = sorted(set(ids.values()))
    if len(distinct) > 1:
        named = ", ".join(f"{h} has {i}" for h, i in ids.items())
        raise UserError(f"the dumps to resume were begun by different harvests (pass_id: {named}); "
                        "resume each with its own --hook and --out, or pass --overwrite")
    return distinct[0] if distinct else new_pass_id()
