"""The `topk` architecture's settings (torch-free, for flags and configs; see `topk`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import UserError
from shared.saes.settings_base import BaseSettings, SAEConfig
from shared.settings import NON_NEGATIVE, POSITIVE, setting


@dataclass
class KeptLatentsSettings(BaseSettings):
    """What every architecture that keeps k latents and revives dead ones by AuxK has."""

    k: int = setting(32, POSITIVE)
    """Latents kept per row (SAELens `k`)."""
    aux_k: int | None = setting(None, POSITIVE)
    """Latents in the AuxK reconstruction of the residual; None -> d_in // 2 (SAELens' default;
    OpenAI used 512). Clamped to d_sae."""
    aux_loss_coefficient: float = setting(1 / 32, NON_NEGATIVE)
    """Weight of the AuxK term (OpenAI's 1/32)."""


@dataclass
class TopKSettings(KeptLatentsSettings):
    sparse_decode: bool | None = None
    """Train through the chosen latents only (True), through a dense f (False), or decide by
    shape (None: sparse when k * 8 <= d_sae). Same results either way; only speed differs."""

    def validate(self, cfg: SAEConfig) -> None:
        super().validate(cfg)
        if self.k > cfg.d_sae:
            raise UserError(f"k must be an integer in [1, d_sae={cfg.d_sae}], got {self.k!r}")


def is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
