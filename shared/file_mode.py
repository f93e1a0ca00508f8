"""The permissions a new file gets: what `open()` would give it, 0o666 less the user's umask.

Some writers create their files private to the user whatever the umask (safetensors' `save_file`
writes 0600), so on a shared machine others could read a run's cfg.json but not the weights beside
it. `shared.atomic.commit` gives every file it renames into place this mode instead.
"""
from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's
    /proc/self/status has it since 4.7); else set and restored at once under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:  # os.umask can only be read by setting it: restore it at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0o666 & ~umask: 0o644 under the usual umask 022, 0o640 under 027."""
    return 0o666 & ~current_umask()


def apply_default_mode(fd: int, mode: int) -> None:
    """Give the open file `fd` the permission bits `mode` unless it already has them."""
    if os.fstat(fd).st_mode & 0o777 != mode:
        os.fchmod(fd, mode)
