"""Pick the device: the one asked for if it exists, else cuda when available, else cpu."""
from __future__ import annotations

import torch

from shared.errors import UserError


def pick_device(device: str | None) -> torch.device:
    """A torch.device; a one-line UserError for a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' does not exist: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"device '{device}' is not supported; use cpu or cuda")
    return dev


def total_bytes(device: torch.device) -> int:
    """All the memory of `device` (GPU memory, or the machine's RAM): what no model may exceed."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
