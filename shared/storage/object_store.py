"""A location in S3-compatible object storage: `s3://bucket/prefix`.

A key joins with `/` like a path and prints as its URL. There are no folders and no renames: a
write is a single PUT, which S3 makes visible whole or not at all.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

from shared.errors import UserError
from shared.storage.base import Capabilities, FreeSpace, Location
from shared.storage.errors import client_error, explain, missing_object, translated
from shared.storage.s3_client import store_for
from shared.storage.waits import call, request

SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_DELETE_BATCH = 1000  # keys per delete request (the S3 limit)


class ObjectStorePath(Location):
    """`s3://bucket/prefix`: an object's key, or the prefix of the keys below it."""

    __slots__ = ("bucket", "key")
    capabilities = Capabilities(formats=("zarr",), folders=False, fetched=True)
    kind = "object storage"

    def __init__(self, url: str):
        if not url.startswith(SCHEME):
            raise UserError(f"{url} is not an s3:// URL")
        bucket, _, key = url[len(SCHEME):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise UserError(f"{url}: '{bucket}' is not a valid bucket name; write s3://BUCKET/PREFIX")
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UserError(f"{url}: '.' and '..' have no meaning in an object key prefix")
        self.bucket = bucket
        self.key = "/".join(parts)

    # ---- naming ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectStorePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> "ObjectStorePath":
        return ObjectStorePath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    @property
    def parent(self) -> "ObjectStorePath":
        return ObjectStorePath(f"{SCHEME}{self.bucket}/{self.key.rpartition('/')[0]}")

    def resolve(self) -> "ObjectStorePath":
        return self

    def is_absolute(self) -> bool:
        return True

    def recorded(self) -> str:
        return self.url  # a URL means the same thing from anywhere

    # ---- the client -----------------------------------------------------------------------
    def _store(self) -> Any:
        """obstore's client rooted at this prefix."""
        return store_for(self.bucket, self.key, self.url)

    def _translated(self, every: bool = False) -> Any:
        return translated(self, f"{SCHEME}{self.bucket}", every)

    # ---- whole objects --------------------------------------------------------------------
    def get_bytes(self) -> bytes | None:
        import obstore

        try:
            store = self.parent._store()
            return call(self.url, lambda: bytes(obstore.get(store, self.name).bytes()))
        except UserError:
            raise
        except Exception as e:
            if missing_object(e):
                return None
            raise explain(self, f"{SCHEME}{self.bucket}", e) from None

    def put_bytes(self, data: bytes) -> None:
        import obstore

        with self._translated(every=True):
            store = self.parent._store()
            call(self.url, lambda: obstore.put(store, self.name, data))

    def list_names(self, limit: int | None = None) -> list[str]:
        import obstore

        def listing(store: Any) -> list[str]:
            out: list[str] = []
            for batch in obstore.list(store, chunk_size=limit or 1000):
                out.extend(meta["path"] for meta in batch)
                if limit is not None and len(out) >= limit:
                    return sorted(out)[:limit]
            return sorted(out)

        with self._translated(every=True):
            store = self._store()
            return call(f"{self.url}/ (a listing)", lambda: listing(store))

    def exists(self) -> bool:
        import obstore

        if self.list_names(limit=1):
            return True
        with self._translated(every=True):
            try:
                store = self.parent._store()
                call(self.url, lambda: obstore.head(store, self.name))
            except Exception as e:
                if missing_object(e):
                    return False
                raise
        return True

    def delete(self) -> None:
        """Every object below `self/` (a zarr shard, say), then an object named `self`."""
        names = self.list_names()
        if names:
            self.delete_names(names)
        self.parent.delete_names([self.name])  # deleting a missing object is fine

    def delete_names(self, names: list[str]) -> None:
        import obstore

        store = self._store()
        with self._translated():
            for start in range(0, len(names), _DELETE_BATCH):
                batch = names[start : start + _DELETE_BATCH]
                call(f"{self.url}/ (a delete)", lambda: obstore.delete(store, batch))

    @contextmanager
    def staged(self) -> Iterator[Location]:
        # No rename here: written in place, after deleting whatever a crashed write left; only a
        # manifest written afterwards makes it part of a dump.
        self.delete()
        yield self

    def ensure_folder(self) -> None:
        """Prefixes need no creating."""

    def free_space(self) -> FreeSpace | None:
        return None  # a bucket has no size limit to check beforehand

    # ---- zarr and failures ----------------------------------------------------------------
    def zarr_store(self, read_only: bool) -> Any:
        """A zarr v3 store over the objects below `self/`."""
        return _watched_zarr_store()(self._store(), read_only=read_only, where=self.url)

    def errors(self) -> Any:
        return self._translated()

    def failure(self, e: BaseException) -> UserError | None:
        return explain(self, f"{SCHEME}{self.bucket}", e) if client_error(e) else None


_ZARR_STORE: Any = None


def _watched_zarr_store() -> Any:
    """zarr's store over obstore, each request of it watched (`waits.request`): a chunk read or
    written with no answer says so on stderr too."""
    global _ZARR_STORE
    if _ZARR_STORE is not None:
        return _ZARR_STORE
    from zarr.storage import ObjectStore

    class Watched(ObjectStore):
        def __init__(self, store: Any, *, read_only: bool = False, where: str = "") -> None:
            super().__init__(store, read_only=read_only)
            self.where = where

        def with_read_only(self, read_only: bool = False) -> Any:
            return type(self)(self.store, read_only=read_only, where=self.where)

        def _url(self, key: str) -> str:
            return f"{self.where}/{key}" if self.where else key

        async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
            with request(self._url(key)):
                return await super().get(key, *args, **kwargs)

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            key_ranges = list(key_ranges)
            first = key_ranges[0][0] if key_ranges else ""
            with request(self._url(first) + (f" and {len(key_ranges) - 1} more" if len(key_ranges) > 1 else "")):
                return await super().get_partial_values(prototype, key_ranges)

        async def exists(self, key: str) -> bool:
            with request(self._url(key)):
                return await super().exists(key)

        async def set(self, key: str, value: Any) -> None:
            with request(self._url(key)):
                return await super().set(key, value)

        async def set_if_not_exists(self, key: str, value: Any) -> None:
            with request(self._url(key)):
                return await super().set_if_not_exists(key, value)

        async def delete(self, key: str) -> None:
            with request(self._url(key)):
                return await super().delete(key)

        async def getsize(self, key: str) -> int:
            with request(self._url(key)):
                return await super().getsize(key)

    _ZARR_STORE = Watched
    return Watched
