"""The `batchtopk` architecture's settings (torch-free, for flags and configs; see `batchtopk`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.saes.topk_settings import TopKSettings
from shared.settings import NON_NEGATIVE, RATE, setting


@dataclass
class BatchTopKSettings(TopKSettings):
    topk_threshold_lr: float = setting(0.01, RATE)
    """Rate of the running estimate of the inference threshold (SAELens' default)."""
    threshold_sample_rows: int = setting(4096, NON_NEGATIVE)
    """Training rows the saved inference threshold is estimated from at every checkpoint: the
    (k * n)-th largest relu(h) over n rows, so that the saved JumpReLU fires k per row on average
    (0: save the running threshold, SAELens' choice, which lags the growing activations)."""
