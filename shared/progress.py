"""Progress on stderr, one way for every phase of the three commands: a tqdm bar for work that
can be counted, one line saying what is happening for work that cannot (loading a model).

`enabled=False` (the commands' `--quiet`) silences both. tqdm is imported when a bar is made, so
that importing this module stays cheap for `--help`.
"""
from __future__ import annotations

import sys
from typing import Any


def bar(total: int | None, desc: str, unit: str, enabled: bool, **options: Any) -> Any:
    """A tqdm bar on stderr over `total` units (disabled, and silent, unless `enabled`)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, **options)


def say(what: str, enabled: bool) -> None:
    """One line on stderr saying what the command is doing now (silent unless `enabled`)."""
    if enabled:
        print(what, file=sys.stderr, flush=True)
