"""Where a dump lives: one small interface (`Location`, in base.py) with a local-disk
implementation (`LocalPath`, a pathlib.Path) and an object-storage one (`ObjectStorePath`,
`s3://bucket/prefix`); `location()` turns what a user gave into the right one.

Callers hold a `Location` and never ask which kind it is: what must differ is asked of
`location.capabilities` or done by a method (`put_bytes`, `staged`, `errors`, ...).
"""
from shared.storage.base import Capabilities, FreeSpace, Location
from shared.storage.local import LocalPath
from shared.storage.locations import SCHEMES, absolute, location
from shared.storage.object_store import ObjectStorePath
from shared.storage.s3_client import endpoint, reset_stores, set_endpoint

# Transitional: the module-level functions of the storage API before `Location` (and the click
# helpers now in shared.cli_options), kept as thin wrappers for modules not yet converted to the
# Location methods; removed once none imports them.
from shared.storage.legacy import (
    SCHEME, RemotePath, check_bucket, delete_names, delete_prefix, dump_error, explain, get_bytes,
    is_remote, list_names, list_names_limited, put_bytes, remote_errors, store_for, zarr_store,
)


def __getattr__(name: str):
    if name in ("ENDPOINT_HELP", "endpoint_option"):  # imported when asked: cli_options imports this package
        from shared import cli_options

        return getattr(cli_options, name)
    raise AttributeError(f"module 'shared.storage' has no attribute {name!r}")


__all__ = [
    "Capabilities", "FreeSpace", "Location", "LocalPath", "ObjectStorePath", "SCHEMES", "absolute",
    "location", "endpoint", "reset_stores", "set_endpoint",
    # transitional (see above)
    "SCHEME", "RemotePath", "check_bucket", "delete_names", "delete_prefix", "dump_error", "explain",
    "get_bytes", "is_remote", "list_names", "list_names_limited", "put_bytes", "remote_errors",
    "store_for", "zarr_store", "ENDPOINT_HELP", "endpoint_option",
]
