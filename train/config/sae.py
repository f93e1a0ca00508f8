"""The `sae` part: the architecture, its size, and the architecture's own settings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.settings import NON_NEGATIVE, POSITIVE, Range, setting

B_DEC_INIT = ("geometric_median", "mean", "zeros")
MIN_D_SAE = 2  # a single feature is no dictionary: its density plots and per-feature statistics break


@dataclass
class SAEPart:
    architecture: str = setting("standard")
    """SAE architecture (see `shared.saes.registry`)."""
    expansion_factor: int = setting(64, POSITIVE)
    """d_sae = expansion_factor x d_in (unless d_sae is given)."""
    d_sae: int | None = setting(None, Range(zero_ok=False, at_least=MIN_D_SAE), default_text="expansion_factor x d_in")
    """Number of features; overrides expansion_factor."""
    init_seed: int | None = setting(None, NON_NEGATIVE, default_text="seed")
    """Seed of the SAE's initial weights alone (None: `seed`, which also orders the data and seeds
    resampling); sweep it (--sweep init_seed=0,1,2) for several inits on one data stream."""
    b_dec_init_method: str = setting("geometric_median", choices=B_DEC_INIT)
    """Decoder bias init: geometric_median, mean (both from the manifest) or zeros."""
    architecture_settings: dict[str, Any] = field(default_factory=dict)
    """The architecture settings given, by name (absent: the architecture's default). Each
    architecture's `Settings` dataclass declares them; `train.config.architectures` lists them."""
