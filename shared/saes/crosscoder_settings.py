"""The `crosscoder` architecture's settings (torch-free, for flags and configs; see `crosscoder`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.saes.settings_base import BaseSettings
from shared.settings import NON_NEGATIVE, setting


@dataclass
class CrosscoderSettings(BaseSettings):
    l1_coefficient: float = setting(1.2, NON_NEGATIVE)
    """Weight of the L1 term, which is averaged over the batch (the seed summed it: seed value x
    train_batch_size is the value here)."""
