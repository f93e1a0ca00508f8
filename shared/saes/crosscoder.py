"""`crosscoder`: the acausal crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer
Features and Model Diffing"): one dictionary whose features read and write K hooks at once.

The input is the K hooks' activations of one token concatenated (`--shards A,B,C`, dumps of one
harvest pass: several layers, say), and so is the target (the same hooks: it reconstructs them):

    f      = ReLU(sum over k of (x_k - b_dec_k) @ W_enc_k + b_enc)    one latent space, [batch, d_sae]
    x_hat_k = f @ W_dec_k + b_dec_k                                   a decoder per hook
    loss   = sum over k of ||x_k - x_hat_k||^2 + l1_coefficient * sum_i f_i * sum_k ||W_dec_k,i||

which is the standard SAE's computation on the concatenation (W_enc_k and W_dec_k are its blocks of
rows and of columns), with the L1 term weighted by the sum of each feature's per-hook decoder
norms (the paper's L1 of norms) and the decoder free (no unit-norm constraint), so the penalty
cannot be dodged by shrinking f. Each hook's block may have its own scale (one expected_norm scale
for the whole concatenation, from the hooks' statistics, is what training folds in). Dead features
are resampled as the standard SAE's. Saved in the standard SAE's tensors under its own name.
"""
from __future__ import annotations

from typing import Any

import torch

from shared.saes.base import SAE, SAEConfig
from shared.saes.crosscoder_settings import CrosscoderSettings
from shared.saes.standard import StandardSAE


class CrosscoderSAE(StandardSAE):
    architecture = "crosscoder"
    Settings = CrosscoderSettings
    settings: CrosscoderSettings  # type: ignore[assignment]

    unit_norm_decoder = False  # the L1 of norms holds the scale (module docstring)

    def __init__(self, cfg: SAEConfig, settings: CrosscoderSettings | None = None,
                 device: str | torch.device = "cpu") -> None:
        SAE.__init__(self, cfg, settings, device)  # not StandardSAE's: no April switch here

    def hook_decoder_norms(self) -> torch.Tensor:
        """[d_sae, K]: each feature's decoder norm into each hook."""
        K = self.cfg.n_hooks
        return self.W_dec.reshape(self.cfg.d_sae, K, self.cfg.d_out // K).norm(dim=-1)

    def l1_penalty(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Mean over rows of sum_i f_i * sum_k ||W_dec_k,i|| (f >= 0)."""
        rows = feature_acts.shape[0]
        return (feature_acts.float() @ self.hook_decoder_norms().sum(dim=1)).sum() / rows

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        _, tensors, extra = super().inference_form()
        return "crosscoder", tensors, extra
