"""The `matryoshka_batchtopk` architecture's settings (torch-free, for flags and configs; see `matryoshka`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError
from shared.saes.batchtopk_settings import BatchTopKSettings
from shared.saes.settings_base import SAEConfig
from shared.saes.topk_settings import is_plain_int


@dataclass
class MatryoshkaBatchTopKSettings(BatchTopKSettings):
    matryoshka_widths: list[int] | None = None
    """Prefix widths, strictly increasing; d_sae is appended if the last is smaller. None ->
    [d_sae // 16, d_sae // 4, d_sae], each at least k, duplicates dropped."""

    def validate(self, cfg: SAEConfig) -> None:
        super().validate(cfg)
        matryoshka_widths(self, cfg)


def matryoshka_widths(settings: MatryoshkaBatchTopKSettings, cfg: SAEConfig) -> list[int]:
    """The prefix widths the settings mean for this shape (the last is d_sae); UserError if bad."""
    widths = settings.matryoshka_widths
    if widths is None:
        return sorted({min(max(w, settings.k), cfg.d_sae) for w in (cfg.d_sae // 16, cfg.d_sae // 4, cfg.d_sae)})
    if not isinstance(widths, (list, tuple)) or not widths or not all(is_plain_int(w) and w > 0 for w in widths):
        raise UserError(f"matryoshka_widths must be a non-empty list of positive integers, got {widths!r}")
    widths = list(widths)
    if any(a >= b for a, b in zip(widths, widths[1:])):
        raise UserError(f"matryoshka_widths must be strictly increasing, got {widths}")
    if widths[-1] > cfg.d_sae:
        raise UserError(f"matryoshka_widths must not exceed d_sae={cfg.d_sae}, got {widths}")
    return widths if widths[-1] == cfg.d_sae else widths + [cfg.d_sae]
