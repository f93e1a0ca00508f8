"""Stage one: run a language model over a token dataset once and write activations to disk.

`harvest` is imported when first used (module `__getattr__`), so that `python -m harvest --help`
does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harvest.config import HarvestConfig
    from harvest.run import harvest

_HOME = {"HarvestConfig": "harvest.config", "harvest": "harvest.run"}

__all__ = ["HarvestConfig", "harvest"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
