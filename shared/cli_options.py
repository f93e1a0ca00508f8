"""click options every command shares (their callbacks act on `shared.storage`)."""
from __future__ import annotations

from typing import Any

from shared.storage import set_endpoint

ENDPOINT_HELP = ("Endpoint of an S3-compatible store for s3:// dumps (MinIO, R2, Ceph) [AWS_ENDPOINT_URL_S3, "
                 "AWS_ENDPOINT_URL, else AWS S3]; credentials from the standard AWS variables and files.")


def endpoint_option(_ctx: Any, _param: Any, value: str | None) -> str | None:
    """click callback of `--s3-endpoint` (commands need no parameter for it)."""
    if value:
        set_endpoint(value)
    return value
