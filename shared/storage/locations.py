"""From what a user or a config gave (a path, a URL) to the `Location` that handles it.

Another kind of storage is one module implementing `Location` and one line in `SCHEMES`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from shared.storage.base import Location
from shared.storage.local import LocalPath
from shared.storage.object_store import ObjectStorePath

SCHEMES: dict[str, Callable[[str], Location]] = {
    "s3": ObjectStorePath,
}
"""URL scheme (what comes before `://`) -> the location class parsing such URLs."""


def scheme_of(value: str) -> str | None:
    """The registered scheme `value` starts with, or None for a local path."""
    scheme, sep, _ = value.partition("://")
    return scheme if sep and scheme in SCHEMES else None


def location(value: str | Path | Location) -> Location:
    """The location `value` names: a URL of a registered scheme, else a local path."""
    if isinstance(value, Location):
        return value
    if isinstance(value, str):
        scheme = scheme_of(value)
        if scheme is not None:
            return SCHEMES[scheme](value)
    return LocalPath(value)


def absolute(value: str | Path | Location) -> str:
    """The location as recorded in run folders: local paths absolute, URLs unchanged."""
    return location(value).recorded()
