"""The `gated` architecture's settings (torch-free, for flags and configs; see `gated`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.saes.settings_base import TargetL0Settings
from shared.settings import NON_NEGATIVE, setting


@dataclass
class GatedSettings(TargetL0Settings):
    l1_coefficient: float = setting(3.0, NON_NEGATIVE)
    """Weight of the gate's L1 term (sum_i relu(pi_i) * ||W_dec_i||, averaged over rows), for
    inputs normalised to E||x|| = sqrt(d_in); the same name as the standard SAE's. On planted
    features (3 active per row, so a feature explains ~d_in/3 of ||x||^2) 3.0 recovered them at
    the right L0 for lr 1e-3..1e-2; 1.2 left L0 about twice too high, with split features."""
