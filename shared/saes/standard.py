"""`standard`: the ReLU SAE with an L1 penalty (Towards Monosemanticity, Anthropic 2023; the seed).

    f     = ReLU((x - b_dec) @ W_enc + b_enc)      f: [batch, d_sae]
    x_hat = f @ W_dec + b_dec                      x_hat: [batch, d_in]
    loss  = ||t - x_hat||^2 + l1_coefficient * sum_i |f_i|        (each averaged over the batch)

with the rows of W_dec held at unit norm, so the L1 penalty cannot be dodged by shrinking f and
growing W_dec. `anthropic_april_update` switches to Anthropic's April 2024 recipe ("Circuits
Updates - April 2024"): the L1 term weights each feature by its decoder norm,
sum_i |f_i| * ||W_dec_i||, which makes the constraint unnecessary, so the decoder is free and
starts at `decoder_init_norm`. (The recipe's L1 warm-up and final lr decay are training settings:
`l1_warm_up_steps`, `lr_decay_steps`, given defaults by the config when the update is on.)
Dead features are resampled (`feature_sampling_method`).
"""
from __future__ import annotations

from typing import Any

import torch

from shared.saes.base import SAE, SAEConfig, StepContext, TrainOutput
from shared.saes.standard_settings import StandardSettings


class StandardSAE(SAE):
    architecture = "standard"
    Settings = StandardSettings
    dead_feature_policy = "resample"
    sparsity_setting, sparsity_label, sparsity_warm_up = "l1_coefficient", "L1", "l1_warm_up_steps"
    settings: StandardSettings
    b_enc: torch.nn.Parameter

    def __init__(self, cfg: SAEConfig, settings: StandardSettings | None = None,
                 device: str | torch.device = "cpu") -> None:
        # The constraint is per instance: the April update drops it.
        self.unit_norm_decoder = not (settings and settings.anthropic_april_update)
        super().__init__(cfg, settings, device)

    def init_extra_(self, device: str | torch.device) -> None:
        self.b_enc = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, device=device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> feature activations [batch, d_sae]."""
        return torch.relu(self.hidden_pre(x))

    def l1_penalty(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Mean over rows of sum_i |f_i| (times ||W_dec_i|| with the April update)."""
        # f >= 0 (a ReLU), so |f| = f: no abs, whose forward and backward would each cost a pass
        # over [batch, d_sae]; the weighted sum is one matrix-vector product.
        rows = feature_acts.shape[0]
        if self.settings.anthropic_april_update:
            return (feature_acts.float() @ self.W_dec.norm(dim=1)).sum() / rows
        return feature_acts.float().sum() / rows

    def training_losses(self, x: torch.Tensor, target: torch.Tensor, step: StepContext) -> TrainOutput:
        feature_acts = self.encode(x)
        sae_out = self.decode(feature_acts)
        coefficient = self.settings.l1_coefficient * step.sparsity_scale * step.sparsity_multiplier
        losses = {"mse": self.reconstruction_error(target, sae_out),
                  "l1_loss": coefficient * self.l1_penalty(feature_acts)}
        return TrainOutput(sae_out, feature_acts, losses, losses["mse"] + losses["l1_loss"])

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return "standard", tensors, {"activation_fn_str": "relu"}

