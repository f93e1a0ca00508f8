"""A location on local disk: a `pathlib.Path` that is also a `Location`, so everything that reads
a local dump as files (memory-mapped safetensors, `open`, numpy) takes it as it is.

Writes go to a hidden temp name, are fsynced and renamed into place (`shared.atomic`).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from shared import atomic
from shared.errors import UserError
from shared.storage.base import Capabilities, FreeSpace, Location

# Subclassing the concrete class (PosixPath or WindowsPath): Path itself cannot be subclassed
# before Python 3.12.
_PathBase: Any = type(Path())


class LocalPath(_PathBase, Location):
    """A file or folder on local disk."""

    __slots__ = ()
    capabilities = Capabilities(formats=("safetensors", "zarr"), folders=True, fetched=False)
    kind = "a local folder"

    def recorded(self) -> str:
        """Absolute, symlinks resolved: the same folder from any working directory."""
        return str(self.resolve())

    def get_bytes(self) -> bytes | None:
        try:
            return self.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def put_bytes(self, data: bytes) -> None:
        tmp = atomic.temp_path(self)
        try:
            tmp.write_bytes(data)
            atomic.commit(tmp, self)
        except BaseException:  # a full disk, Ctrl-C: the old file stays, no half-written temp beside it
            tmp.unlink(missing_ok=True)
            raise

    def list_names(self, limit: int | None = None) -> list[str]:
        if not self.is_dir():
            return []
        names = sorted(p.relative_to(self).as_posix() for p in self.rglob("*") if p.is_file())
        return names if limit is None else names[:limit]

    def delete(self) -> None:
        if self.is_dir():
            shutil.rmtree(self)
        elif self.exists():
            self.unlink()

    @contextmanager
    def staged(self) -> Iterator[Location]:
        tmp = atomic.temp_path(self)
        tmp.delete()
        yield tmp
        atomic.commit(tmp, self)

    def ensure_folder(self) -> None:
        self.mkdir(parents=True, exist_ok=True)

    def free_space(self) -> FreeSpace:
        probe = self
        while not probe.exists():
            probe = probe.parent
        return FreeSpace(shutil.disk_usage(probe).free, str(probe.resolve()))

    def zarr_store(self, read_only: bool) -> Any:
        # zarr makes its own local store from the path, read-only or not as the open mode says.
        return os.fspath(self)

    def errors(self) -> Any:
        return nullcontext()  # an OSError already says what went wrong, with its file

    def failure(self, e: BaseException) -> UserError | None:
        return None
