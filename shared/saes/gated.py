"""`gated`: the Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated
Sparse Autoencoders", arXiv 2404.16014).

Which features fire and how strongly are decided by two paths that share W_enc's directions:

    s         = x - b_dec
    pi        = s @ W_enc + b_gate                          gate pre-activation [batch, d_sae]
    magnitude = relu(s @ (W_enc * exp(r_mag)) + b_mag)      per-feature rescaled encoder
    f         = 1[pi > 0] * magnitude
    x_hat     = f @ W_dec + b_dec

    loss = ||t - x_hat||^2                                             "mse"
         + l1_coefficient * sum_i relu(pi_i) * sg(||W_dec_i||)         "l1_loss"
         + ||relu(pi) @ sg(W_dec) + sg(b_dec) - t||^2                  "aux_loss"
    (each averaged over rows; sg = stop-gradient; t the target, x itself for an SAE)

The L1 penalty sits on the gate only, so it does not shrink the magnitudes (the shrinkage the
paper set out to remove); the gate 1[pi > 0] passes no gradient, and the auxiliary loss teaches
the gate path to reconstruct through a frozen copy of the decoder, as in the paper.

The decoder is free and starts at `decoder_init_norm`: instead of the paper's unit-norm
constraint, the L1 weighs each feature by its decoder norm (Anthropic's April 2024 penalty). The
decoder must then be frozen in the penalty too, as it is in the auxiliary loss: frozen in one and
live in the other, the penalty shrinks ||W_dec|| with nothing to hold it up (the magnitudes make
up for it through r_mag), the gate path's frozen reconstruction fails and L0 stays high. Measured
on the planted-feature test: ||W_dec|| 0.1 -> 0.009 in 1200 steps, L0 ~45 of 64, features not
recovered. Rajamanoharan (LessWrong comment on the paper, 2024) gives the same advice: with this
penalty, freeze the decoder in both places or in neither.

On disk (SAELens' `gated`): W_enc, W_dec, b_dec, b_gate, r_mag, b_mag (no b_enc).
"""
from __future__ import annotations

from typing import Any

import torch

from shared.saes.base import SAE, StepContext, TrainOutput
from shared.saes.gated_settings import GatedSettings


class GatedSAE(SAE):
    architecture = "gated"
    Settings = GatedSettings
    unit_norm_decoder = False
    sparsity_setting, sparsity_label, sparsity_warm_up = "l1_coefficient", "L1", "l1_warm_up_steps"
    settings: GatedSettings
    b_gate: torch.nn.Parameter
    r_mag: torch.nn.Parameter
    b_mag: torch.nn.Parameter

    def init_extra_(self, device: str | torch.device) -> None:
        d_sae = self.cfg.d_sae
        self.b_gate = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.r_mag = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_mag = torch.nn.Parameter(torch.zeros(d_sae, device=device))

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi, magnitude): the gate pre-activations and relu'd magnitudes, each [batch, d_sae]."""
        s = self.encoder_input(x)
        pi = s @ self.W_enc + self.b_gate
        magnitude = torch.relu(s @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
        return pi, magnitude

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> 1[pi > 0] * magnitude: [batch, d_sae], as SAELens computes it."""
        pi, magnitude = self.gate_and_magnitude(x)
        return (pi > 0).to(magnitude.dtype) * magnitude

    def training_losses(self, x: torch.Tensor, target: torch.Tensor, step: StepContext) -> TrainOutput:
        pi, magnitude = self.gate_and_magnitude(x)
        feature_acts = (pi > 0).to(magnitude.dtype) * magnitude
        sae_out = self.decode(feature_acts)
        gate_acts = torch.relu(pi)
        decoder_norms = self.W_dec.detach().norm(dim=1)  # frozen, as in aux_loss (module docstring)
        l1 = (gate_acts.float() * decoder_norms).sum(dim=-1).mean()
        via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        coefficient = self.settings.l1_coefficient * step.sparsity_scale * step.sparsity_multiplier
        losses = {"mse": self.reconstruction_error(target, sae_out), "l1_loss": coefficient * l1,
                  "aux_loss": self.reconstruction_error(target, via_gate)}
        return TrainOutput(sae_out, feature_acts, losses, losses["mse"] + losses["l1_loss"] + losses["aux_loss"])

    @torch.no_grad()
    def shift_encoder_bias_(self, delta: torch.Tensor) -> None:
        """Both paths' pre-activations move by the same s-term: pi by delta [d_sae] through
        b_gate, the magnitude's by delta * exp(r_mag) through b_mag (its encoder is W_enc * exp(r_mag))."""
        self.b_gate += delta
        self.b_mag += delta * torch.exp(self.r_mag)

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                   "b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag}
        return "gated", tensors, {}
