"""The `standard` architecture's settings (torch-free, for flags and configs; see `standard`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.saes.settings_base import TargetL0Settings
from shared.settings import NON_NEGATIVE, setting


@dataclass
class StandardSettings(TargetL0Settings):
    l1_coefficient: float = setting(1.2, NON_NEGATIVE)
    """Weight of the L1 term, which is averaged over the batch (the seed summed it: seed value x
    train_batch_size is the value here)."""
    anthropic_april_update: bool = False
    """L1 weighted by decoder row norms and no unit-norm constraint (Anthropic, April 2024)."""
