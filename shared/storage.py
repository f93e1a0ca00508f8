"""Where a dump lives: a local folder (a `Path`) or an object-storage prefix (`s3://bucket/prefix`).

Local dumps keep their own code paths (memory-mapped safetensors, temp + fsync + rename); this
module only adds what object storage needs: `RemotePath` (a URL that joins like a path), the store
of a bucket (obstore's S3 client, credentials and endpoint from the standard AWS settings), a few
whole-object operations, and the translation of storage failures into one-line `UserError`s.

Credentials and region come from the standard AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION) or, without them, from
boto3's chain (AWS_PROFILE, ~/.aws/config and credentials, SSO, instance roles). The endpoint of an
S3-compatible service (MinIO, R2, Ceph) comes from `--s3-endpoint` (`set_endpoint`), else
AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared.errors import DumpError, UserError

SCHEME = "s3://"
_endpoint_override: str | None = None
_stores: dict[tuple[str, str, str | None], Any] = {}
_lock = threading.Lock()


def is_remote(location: Any) -> bool:
    """True for `s3://...` strings and `RemotePath`s."""
    return isinstance(location, RemotePath) or (isinstance(location, str) and location.startswith(SCHEME))


class RemotePath:
    """`s3://bucket/prefix`: joins with `/` like a Path, prints as its URL, resolves to itself."""

    __slots__ = ("bucket", "key")

    def __init__(self, url: str):
        if not url.startswith(SCHEME):
            raise UserError(f"{url} is not an s3:// URL")
        bucket, _, key = url[len(SCHEME):].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise UserError(f"{url}: '{bucket}' is not a valid bucket name; write s3://BUCKET/PREFIX")
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UserError(f"{url}: '.' and '..' have no meaning in an object key prefix")
        self.bucket = bucket
        self.key = "/".join(parts)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(f"{SCHEME}{self.bucket}/{self.key.rpartition('/')[0]}")

    def resolve(self) -> "RemotePath":
        return self

    def is_absolute(self) -> bool:
        return True


def location(value: str | Path | RemotePath) -> Path | RemotePath:
    """A dump location from what a user or a config gave: s3:// URLs stay URLs."""
    if isinstance(value, (Path, RemotePath)):
        return value
    return RemotePath(value) if is_remote(value) else Path(value)


def absolute(value: str | Path | RemotePath) -> str:
    """The location as recorded in run folders: local paths absolute, URLs unchanged."""
    return str(value) if is_remote(value) else str(Path(value).resolve())


# ---- the store of a bucket ------------------------------------------------------------------
def set_endpoint(url: str | None) -> None:
    """`--s3-endpoint`: an S3-compatible service's URL, overriding the environment."""
    global _endpoint_override
    _endpoint_override = url or None


ENDPOINT_HELP = ("Endpoint of an S3-compatible store for s3:// dumps (MinIO, R2, Ceph) [AWS_ENDPOINT_URL_S3, "
                 "AWS_ENDPOINT_URL, else AWS S3]; credentials from the standard AWS variables and files.")


def endpoint_option(_ctx: Any, _param: Any, value: str | None) -> str | None:
    """click callback of `--s3-endpoint` (commands need no parameter for it)."""
    if value:
        set_endpoint(value)
    return value


def endpoint() -> str | None:
    return _endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    try:
        import boto3

        return boto3.session.Session().region_name or "us-east-1"
    except Exception:
        return "us-east-1"


def _credentials() -> dict[str, Any]:
    """Keys from the environment, else boto3's whole chain (profiles, config files, SSO, roles)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        out = {"access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
               "secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
        if os.environ.get("AWS_SESSION_TOKEN"):
            out["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return out
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise UserError("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                        "(or install boto3 to use AWS_PROFILE and ~/.aws files)") from None
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise UserError("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                        "or AWS_PROFILE with ~/.aws/credentials")
    return {"credential_provider": Boto3CredentialProvider(session)}


def store_for(where: RemotePath) -> Any:
    """obstore's S3 client rooted at `where`'s prefix (cached: one connection pool per prefix)."""
    url = endpoint()
    cache_key = (where.bucket, where.key, url)
    with _lock:
        if cache_key in _stores:
            return _stores[cache_key]
        try:
            from obstore.store import S3Store
        except ImportError:
            raise UserError(f"{where}: reading and writing s3:// dumps needs obstore: "
                            "pip install 'mats-sae-training[s3]'") from None
        kwargs: dict[str, Any] = {"region": _region(), **_credentials()}
        if url:
            kwargs.update(endpoint=url, virtual_hosted_style_request=False)
        store = S3Store(
            where.bucket, prefix=where.key or None,
            client_options={"connect_timeout": "10s", "timeout": "300s", "allow_http": bool(url and url.startswith("http://"))},
            retry_config={"max_retries": 4, "retry_timeout": dt.timedelta(seconds=60),
                          "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                                      "max_backoff": dt.timedelta(seconds=5), "base": 2}},
            **kwargs)
        _stores[cache_key] = store
        return store


def reset_stores() -> None:
    """Forget cached clients (after credentials or the endpoint changed)."""
    with _lock:
        _stores.clear()


# ---- errors ---------------------------------------------------------------------------------
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


def explain(where: RemotePath, e: BaseException) -> UserError:
    """One line saying what went wrong with `where` and what to do."""
    text = str(e)
    code = _CODE.search(text)
    code = code.group(1) if code else ""
    bucket = f"{SCHEME}{where.bucket}"
    if code == "NoSuchBucket":
        return UserError(f"{where}: the bucket {bucket} does not exist (create it, or check the name "
                         "and the endpoint)")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "AccessDenied", "AllAccessDisabled") or type(e).__name__ in ("PermissionDeniedError",
                                                                              "UnauthenticatedError"):
        why = {"InvalidAccessKeyId": "the access key is not known to the service",
               "SignatureDoesNotMatch": "the secret key is wrong",
               "ExpiredToken": "the session token has expired"}.get(code, "access denied")
        return UserError(f"{where}: {why} ({code or type(e).__name__}); check AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket's permissions")
    if "error sending request" in text or "dns error" in text.lower() or "connect" in text.lower():
        return UserError(f"{where}: cannot reach the object store at {endpoint() or 'AWS S3'} "
                         "(check --s3-endpoint / AWS_ENDPOINT_URL and the network)")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return UserError(f"{where}: object storage error ({first[:200]})")


@contextmanager
def remote_errors(where: RemotePath) -> Iterator[None]:
    """Turn obstore's failures inside the block into a one-line UserError about `where`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if type(e).__module__.startswith("obstore") or "obstore" in type(e).__module__ \
                or isinstance(e, (OSError, ConnectionError, TimeoutError)):
            raise explain(where, e) from None
        raise


def _not_found(e: BaseException) -> bool:
    return type(e).__name__ == "NotFoundError" or isinstance(e, FileNotFoundError)


# ---- whole objects --------------------------------------------------------------------------
def get_bytes(where: RemotePath) -> bytes | None:
    """The object at `where`, or None if there is none."""
    import obstore

    try:
        return bytes(obstore.get(store_for(where.parent), where.name).bytes())
    except UserError:
        raise
    except Exception as e:
        if _not_found(e) and "NoSuchBucket" not in str(e):
            return None
        raise explain(where, e) from None


def _bucket_missing_check(e: Exception, where: RemotePath) -> None:
    if _not_found(e) or "NoSuchBucket" in str(e):
        raise UserError(f"{where}: the bucket {SCHEME}{where.bucket} does not exist (create it, or "
                        "check the name and the endpoint)") from None


def put_bytes(where: RemotePath, data: bytes) -> None:
    """Write one object; S3 makes a PUT visible all at once or not at all."""
    import obstore

    try:
        with remote_errors(where):
            obstore.put(store_for(where.parent), where.name, data)
    except UserError:
        raise
    except Exception as e:
        _bucket_missing_check(e, where)
        raise explain(where, e) from None


def list_names(where: RemotePath) -> list[str]:
    """Keys below the prefix `where`, relative to it (every object, recursively)."""
    import obstore

    store = store_for(where)
    out: list[str] = []
    try:
        with remote_errors(where):
            for batch in obstore.list(store, chunk_size=1000):
                out.extend(meta["path"] for meta in batch)
    except UserError:
        raise
    except Exception as e:
        _bucket_missing_check(e, where)
        raise explain(where, e) from None
    return out


def delete_names(where: RemotePath, names: list[str]) -> None:
    """Delete objects `names` (relative to the prefix `where`)."""
    import obstore

    store = store_for(where)
    with remote_errors(where):
        for start in range(0, len(names), 1000):
            obstore.delete(store, names[start : start + 1000])


def delete_prefix(where: RemotePath) -> None:
    """Delete every object below `where/` (a zarr shard, for instance)."""
    names = list_names(where)
    if names:
        delete_names(where, names)


def zarr_store(where: RemotePath, read_only: bool) -> Any:
    """A zarr v3 store over the objects below `where/`."""
    from zarr.storage import ObjectStore

    return ObjectStore(store_for(where), read_only=read_only)


def check_bucket(where: RemotePath) -> None:
    """Fail early, in one line, when the bucket is missing or unreachable or the keys are wrong."""
    list_names_limited(where)


def list_names_limited(where: RemotePath, limit: int = 1) -> list[str]:
    import obstore

    try:
        with remote_errors(where):
            for batch in obstore.list(store_for(where), chunk_size=limit):
                return [meta["path"] for meta in batch]
    except UserError:
        raise
    except Exception as e:
        _bucket_missing_check(e, where)
        raise explain(where, e) from None
    return []


def dump_error(where: Any, e: BaseException) -> DumpError:
    """A read of a dump object failed: a DumpError naming the object."""
    err = explain(where, e) if isinstance(where, RemotePath) else UserError(f"{where}: {e}")
    return DumpError(str(err))
