"""The cross-layer transcoders' settings (torch-free, for flags and configs; see `clt`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError
from shared.saes.jumprelu_settings import JumpReLUSettings
from shared.saes.settings_base import BaseSettings, SAEConfig
from shared.saes.topk_settings import KeptLatentsSettings


def check_clt_shape(settings: BaseSettings, cfg: SAEConfig) -> None:
    """What every cross-layer transcoder needs of its shape and settings."""
    if settings.skip_connection:
        raise UserError("a cross-layer transcoder has no skip path (circuit-tracer's form has none): drop "
                        "skip_connection")
    if cfg.d_sae % cfg.n_hooks:
        raise UserError(f"a cross-layer transcoder has the same number of features at each of its {cfg.n_hooks} "
                        f"layers: d_sae {cfg.d_sae} must be a multiple of {cfg.n_hooks}")


@dataclass
class JumpReLUCLTSettings(JumpReLUSettings):
    """The JumpReLU settings, for every layer's features (the L0 term counts them all)."""

    def validate(self, cfg: SAEConfig) -> None:
        super().validate(cfg)
        check_clt_shape(self, cfg)


@dataclass
class TopKCLTSettings(KeptLatentsSettings):
    """TopK's settings; k is kept per layer (so L0 = n_layers x k), aux_k per layer too."""

    def validate(self, cfg: SAEConfig) -> None:
        super().validate(cfg)
        check_clt_shape(self, cfg)
        per_layer = cfg.d_sae // cfg.n_hooks
        if self.k > per_layer:
            raise UserError(f"k (kept per layer) must be at most the {per_layer} features of a layer, got {self.k}")
