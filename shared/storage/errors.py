"""Failures of object storage as one line saying what went wrong and what to do."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from shared.errors import UserError
from shared.storage.s3_client import endpoint
from shared.storage.waits import gave_up_line

_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccessDenied",
           "AllAccessDisabled")
_WHY = {"InvalidAccessKeyId": "the access key is not known to the service",
        "SignatureDoesNotMatch": "the secret key is wrong",
        "ExpiredToken": "the session token has expired"}


def client_error(e: BaseException) -> bool:
    """Raised by the object-storage client itself (obstore's exceptions)."""
    return "obstore" in type(e).__module__


def storage_error(e: BaseException) -> bool:
    """A failure of the storage or of the way to it: the client's, or the network's and the
    operating system's as zarr and obstore pass them on."""
    return client_error(e) or isinstance(e, (OSError, ConnectionError, TimeoutError))


def missing_object(e: BaseException) -> bool:
    """The object is not there (its bucket is)."""
    return (type(e).__name__ == "NotFoundError" or isinstance(e, FileNotFoundError)) and "NoSuchBucket" not in str(e)


def timed_out(e: BaseException) -> bool:
    """The request (every attempt of it) got no answer in time."""
    text = str(e)
    return isinstance(e, TimeoutError) or "kind: Timeout" in text or "operation timed out" in text.lower()


def explain(where: object, bucket: str, e: BaseException) -> UserError:
    """One line saying what went wrong with `where` (in the bucket URL `bucket`) and what to do."""
    text = str(e)
    found = _CODE.search(text)
    code = found.group(1) if found else ""
    if code == "NoSuchBucket" or "NoSuchBucket" in text:
        return UserError(f"{where}: the bucket {bucket} does not exist (create it, or check the name "
                         "and the endpoint)")
    if code in _DENIED or type(e).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
        why = _WHY.get(code, "access denied")
        return UserError(f"{where}: {why} ({code or type(e).__name__}); check AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket's permissions")
    if timed_out(e):
        return UserError(f"{where}: {gave_up_line(endpoint() or 'AWS S3')}")
    if "error sending request" in text or "dns error" in text.lower() or "connect" in text.lower():
        return UserError(f"{where}: cannot reach the object store at {endpoint() or 'AWS S3'} "
                         "(check --s3-endpoint / AWS_ENDPOINT_URL and the network)")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return UserError(f"{where}: object storage error ({first[:200]})")


@contextmanager
def translated(where: object, bucket: str, every: bool = False) -> Iterator[None]:
    """Inside the block, storage failures (with `every`, all exceptions) become `explain`'s line;
    a UserError passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if every or storage_error(e):
            raise explain(where, bucket, e) from None
        raise
