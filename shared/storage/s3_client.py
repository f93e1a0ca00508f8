"""The client of S3-compatible object storage (obstore's S3Store), one per bucket prefix.

Credentials and region come from the standard AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION) or, without them, from
boto3's chain (AWS_PROFILE, ~/.aws/config and credentials, SSO, instance roles). The endpoint of an
S3-compatible service (MinIO, R2, Ceph) comes from `--s3-endpoint` (`set_endpoint`), else
AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL. How long a request may go unanswered, its retries
included, is MATS_SAE_S3_TIMEOUT or `--s3-timeout` (`shared.storage.waits`).
"""
from __future__ import annotations

import datetime as dt
import os
import threading
from typing import Any

from shared.errors import UserError
from shared.storage import waits

_endpoint_override: str | None = None
_stores: dict[tuple[str, str, str | None, float], Any] = {}
_lock = threading.Lock()


def set_endpoint(url: str | None) -> None:
    """`--s3-endpoint`: an S3-compatible service's URL, overriding the environment."""
    global _endpoint_override
    _endpoint_override = url or None


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


def store_for(bucket: str, prefix: str, url_for_messages: str) -> Any:
    """obstore's S3 client rooted at `prefix` of `bucket` (cached: one connection pool per prefix)."""
    url = endpoint()
    bound = waits.plan()
    cache_key = (bucket, prefix, url, bound.total)
    with _lock:
        if cache_key in _stores:
            return _stores[cache_key]
        try:
            from obstore.store import S3Store
        except ImportError:
            raise UserError(f"{url_for_messages}: reading and writing s3:// dumps needs obstore: "
                            "pip install 'mats-sae-training[s3]'") from None
        kwargs: dict[str, Any] = {"region": _region(), **_credentials()}
        if url:
            kwargs.update(endpoint=url, virtual_hosted_style_request=False)
        # Each attempt may go `per_attempt` s without an answer (no connection, no byte read: a
        # large transfer that keeps reading is not cut), and none starts after `retry_window`.
        per = dt.timedelta(seconds=bound.per_attempt)
        store = S3Store(
            bucket, prefix=prefix or None,
            client_options={"connect_timeout": per, "read_timeout": per,
                            "timeout": dt.timedelta(seconds=max(300.0, bound.total)),
                            "allow_http": bool(url and url.startswith("http://"))},
            retry_config={"max_retries": bound.attempts - 1, "retry_timeout": dt.timedelta(seconds=bound.retry_window),
                          "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                                      "max_backoff": dt.timedelta(seconds=5), "base": 2}},
            **kwargs)
        _stores[cache_key] = store
        return store


def reset_stores() -> None:
    """Forget cached clients (after credentials or the endpoint changed)."""
    with _lock:
        _stores.clear()
