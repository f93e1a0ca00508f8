"""The `batchtopk` architecture's settings (torch-free, for flags and configs; see `batchtopk`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.saes.topk_settings import TopKSettings
from shared.settings import RATE, setting


@dataclass
class BatchTopKSettings(TopKSettings):
    topk_threshold_lr: float = setting(0.01, RATE)
    """Rate of the running estimate of the inference threshold (SAELens' default)."""
