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
