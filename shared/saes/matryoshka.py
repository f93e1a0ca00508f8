"""`matryoshka_batchtopk`: the Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders", arXiv 2503.17547; Nabeshima 2025);
saved, and used at inference, as a JumpReLU SAE, like BatchTopK.

One BatchTopK encoding f (see batchtopk.py); with widths m_1 < m_2 < ... < m_n = d_sae, every
prefix of the dictionary must reconstruct x on its own:

    x_hat_j = f[:, :m_j] @ W_dec[:m_j] + b_dec
    loss    = sum_j ||x - x_hat_j||^2 + AuxK                (each averaged over rows)

so the first latents learn general features and later ones refine them instead of absorbing
them. Loss terms: "mse" is the full width's (x_hat_n, the SAE's reconstruction), "inner_mse_<m_j>"
the others'; AuxK reads the full reconstruction's residual.
"""
from __future__ import annotations

import torch

from shared.saes.batchtopk import BatchTopKSAE
from shared.saes.matryoshka_settings import MatryoshkaBatchTopKSettings, matryoshka_widths
from shared.saes.topk import Selection


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    Settings = MatryoshkaBatchTopKSettings
    shape_settings = (*BatchTopKSAE.shape_settings, "matryoshka_widths")  # each prefix's reconstruction is trained into the weights
    settings: MatryoshkaBatchTopKSettings

    @property
    def widths(self) -> list[int]:
        """Prefix widths, strictly increasing, the last d_sae."""
        return matryoshka_widths(self.settings, self.cfg)

    def reconstruction_losses(self, target: torch.Tensor, sel: Selection, vals: torch.Tensor,
                              dense: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One term per prefix against target [batch, d_out]; x_hat_j built as x_hat_{j-1} + the
        next group's contribution."""
        losses: dict[str, torch.Tensor] = {}
        sae_out = self.b_dec.expand(target.shape[0], -1)
        lo = 0
        widths = self.widths
        for width in widths:
            sae_out = sae_out + self._decode_pairs(sel, vals, dense, lo, width)
            name = "mse" if width == widths[-1] else f"inner_mse_{width}"
            losses[name] = self.reconstruction_error(target, sae_out)
            lo = width
        # Generic code reads "mse" first.
        return {"mse": losses.pop("mse"), **losses}, sae_out
