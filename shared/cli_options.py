"""click options every command shares (their callbacks act on `shared.storage`)."""
from __future__ import annotations

from typing import Any

from shared.errors import UserError
from shared.storage import set_endpoint
from shared.storage.waits import DEFAULT_S, ENV, set_bound

ENDPOINT_HELP = ("Endpoint of an S3-compatible store for s3:// dumps (MinIO, R2, Ceph) [AWS_ENDPOINT_URL_S3, "
                 "AWS_ENDPOINT_URL, else AWS S3]; credentials from the standard AWS variables and files.")


def endpoint_option(_ctx: Any, _param: Any, value: str | None) -> str | None:
    """click callback of `--s3-endpoint` (commands need no parameter for it)."""
    if value:
        set_endpoint(value)
    return value


TIMEOUT_HELP = (f"Seconds a request to object storage may go unanswered, its retries included, before the "
                f"command gives up (a line on stderr says so while it waits) [{ENV}, else {DEFAULT_S:g}].")


def timeout_option(_ctx: Any, param: Any, value: str | None) -> str | None:
    """click callback of `--s3-timeout`."""
    if value is not None:
        import click

        try:
            set_bound(value)
        except UserError:
            raise click.BadParameter(f"must be a number of seconds above 0, got '{value}'", param=param) from None
    return value
