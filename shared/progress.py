"""Progress on stderr, one way for every phase of the three commands: a tqdm bar for work that
can be counted, one line saying what is happening for work that cannot (loading a model).

`enabled=False` (the commands' `--quiet`) silences both. tqdm is imported when a bar is made, so
that importing this module stays cheap for `--help`.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def bar(total: int | None, desc: str, unit: str, enabled: bool, **options: Any) -> Any:
    """A tqdm bar on stderr over `total` units (disabled, and silent, unless `enabled`)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, **options)


def say(what: str, enabled: bool) -> None:
    """One line on stderr saying what the command is doing now (silent unless `enabled`)."""
    if enabled:
        print(what, file=sys.stderr, flush=True)


_Event = threading.Event  # what the beats wait on (a test drives them with a fake one)


@contextmanager
def still(what: str, enabled: bool, every: float = 5.0) -> Iterator[None]:
    """While the block runs, say every `every` seconds that the command is still `what` (with the
    seconds so far), for work that cannot be counted and may take a while (loading a model, a
    one-time conversion): no phase stays silent for longer. Silent unless `enabled`."""
    if not enabled:
        yield
        return
    done = _Event()
    started = time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            print(f"  ... still {what} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, name="progress-still", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
