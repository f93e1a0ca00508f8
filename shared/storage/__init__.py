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

__all__ = [
    "Capabilities", "FreeSpace", "Location", "LocalPath", "ObjectStorePath", "SCHEMES", "absolute",
    "location", "endpoint", "reset_stores", "set_endpoint",
]
