"""The one interface every place a dump can live implements (a local folder, an object-storage
prefix): callers hold a `Location` and never ask which kind it is.

What differs between kinds is said once, by `Capabilities`, or done by a method that does the
right thing (`put_bytes` is temp + fsync + rename on disk and a single PUT in a bucket).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.errors import UserError


@dataclass(frozen=True)
class Capabilities:
    """How a kind of location behaves, where callers must act differently."""

    formats: tuple[str, ...]
    """Shard formats a dump there can use, the default first. Object storage holds zarr only:
    each chunk is its own object, where a safetensors shard would be one huge object."""
    folders: bool
    """A file system: a folder exists or not by itself (a dump's must exist to be read, and is
    created before writing), and a write lands by fsync + rename from a hidden temp name, so a
    crash leaves temp names. Without folders (object storage) a prefix needs no creating and a
    write is a single PUT written in place, so a crash leaves objects no manifest lists."""
    fetched: bool
    """Every read is a network request: dumps are read in whole chunks with many requests in
    flight, their zarr chunks are sized for one request and carry a crc32c each, and fetched
    chunks may be kept in the local chunk cache."""


@dataclass(frozen=True)
class FreeSpace:
    """Room left where a dump will be written."""

    bytes: int
    at: str
    """The existing folder that was measured (the dump's own, or the nearest above it)."""


class Location(ABC):
    """A file or folder (a key or prefix) where dumps are read and written.

    Joins with `/`, has `name` and `parent`, prints as what a user would type.
    """

    __slots__ = ()
    capabilities: ClassVar[Capabilities]
    kind: ClassVar[str]
    """What this kind is called in messages ("a local folder", "object storage")."""

    # ---- naming ---------------------------------------------------------------------------
    @abstractmethod
    def __truediv__(self, name: str) -> "Location":
        """The location `name` below this one (`name` may hold `/`)."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def parent(self) -> "Location": ...

    @abstractmethod
    def recorded(self) -> str:
        """How run folders record it: read back from any working directory."""

    # ---- whole files / objects ------------------------------------------------------------
    @abstractmethod
    def get_bytes(self) -> bytes | None:
        """The whole file or object, or None if there is none."""

    @abstractmethod
    def put_bytes(self, data: bytes) -> None:
        """Replace it with `data`, all at once or not at all."""

    @abstractmethod
    def list_names(self, limit: int | None = None) -> list[str]:
        """Every file or object below, recursively, as `/`-joined names relative to this location,
        in sorted order (at most `limit` of them)."""

    @abstractmethod
    def exists(self) -> bool:
        """A file or object of this name, or anything below it."""

    @abstractmethod
    def delete(self) -> None:
        """Remove it and everything below it; nothing there is fine."""

    def delete_names(self, names: list[str]) -> None:
        """Remove `names` (relative to this location, as `list_names` gives them)."""
        for name in names:
            (self / name).delete()

    @abstractmethod
    def staged(self) -> AbstractContextManager["Location"]:
        """Write a file or zarr folder to the location the block is given; it is in place, whole,
        once the block ends without an error (leftovers of an earlier crash are removed first)."""

    @abstractmethod
    def ensure_folder(self) -> None:
        """Make sure a folder exists here before files are written below it."""

    @abstractmethod
    def free_space(self) -> FreeSpace | None:
        """Room left for a dump here, or None where there is no such limit to check."""

    # ---- zarr and failures ----------------------------------------------------------------
    @abstractmethod
    def zarr_store(self, read_only: bool) -> Any:
        """What `zarr.open_group` opens for a zarr group here."""

    @abstractmethod
    def errors(self) -> AbstractContextManager[None]:
        """Inside the block, failures of this kind's storage become a one-line UserError naming
        this location; other exceptions pass unchanged."""

    @abstractmethod
    def failure(self, e: BaseException) -> UserError | None:
        """One line about `e` if it is an error of this kind's storage client, else None."""
