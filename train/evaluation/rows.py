"""Dump rows as evaluation reads them: float32 on the SAE's device, and never silently non-finite."""
from __future__ import annotations

import torch

from shared.errors import DumpError
from shared.reader import Dump


def float_rows(dump: Dump, start: int, stop: int, device: str | torch.device) -> torch.Tensor:
    """Activations of rows [start, stop) as float32 [rows, d_in] on `device`.

    A NaN or infinity would turn every metric computed from these rows into NaN (or worse, a
    plausible number); checksums only prove the bytes are those harvest wrote, so check the values.
    """
    x = dump.activations(start, stop).to(device, torch.float32)
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        row = start + int((~finite).nonzero()[0, 0])
        raise DumpError(f"{dump.path}: row {row} holds non-finite activations; re-harvest the dump")
    return x
