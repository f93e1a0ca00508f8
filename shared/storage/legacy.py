"""The module-level functions of the storage API before `Location` existed, each a thin wrapper
over a `Location` method (see the comment in `shared/storage/__init__.py`)."""
from __future__ import annotations

from typing import Any

from shared.errors import DumpError, UserError
from shared.storage.base import Location
from shared.storage.errors import explain as _explain
from shared.storage.locations import location, scheme_of
from shared.storage.object_store import SCHEME, ObjectStorePath

RemotePath = ObjectStorePath


def is_remote(value: Any) -> bool:
    """True for URLs of object storage and the locations they name."""
    if isinstance(value, Location):
        return not value.capabilities.folders
    return isinstance(value, str) and scheme_of(value) is not None


def get_bytes(where: Any) -> bytes | None:
    return location(where).get_bytes()


def put_bytes(where: Any, data: bytes) -> None:
    location(where).put_bytes(data)


def list_names(where: Any) -> list[str]:
    return location(where).list_names()


def list_names_limited(where: Any, limit: int = 1) -> list[str]:
    return location(where).list_names(limit=limit)


def check_bucket(where: Any) -> None:
    """Fail early, in one line, when the bucket is missing or unreachable or the keys are wrong."""
    location(where).list_names(limit=1)


def delete_names(where: Any, names: list[str]) -> None:
    location(where).delete_names(names)


def delete_prefix(where: Any) -> None:
    location(where).delete()


def zarr_store(where: Any, read_only: bool) -> Any:
    return location(where).zarr_store(read_only)


def remote_errors(where: Any) -> Any:
    return location(where).errors()


def explain(where: ObjectStorePath, e: BaseException) -> UserError:
    return _explain(where, f"{SCHEME}{where.bucket}", e)


def store_for(where: ObjectStorePath) -> Any:
    return where._store()


def dump_error(where: Any, e: BaseException) -> DumpError:
    """A read of a dump object failed: a DumpError naming the object."""
    err = explain(where, e) if isinstance(where, ObjectStorePath) else UserError(f"{where}: {e}")
    return DumpError(str(err))
