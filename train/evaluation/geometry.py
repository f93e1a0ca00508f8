"""The decoder's geometry: each feature's nearest features by cosine similarity of decoder rows.

A feature whose nearest neighbour's direction is almost the same (cosine above 0.9) is most likely
a duplicate: the fraction of such features is a cheap whole-SAE diagnostic of wasted capacity.
"""
from __future__ import annotations

import torch

DUPLICATE_COSINE = 0.9
"""Nearest-neighbour cosine similarity above which a feature counts as a near-duplicate."""


@torch.inference_mode()
def decoder_neighbours(W_dec: torch.Tensor, k: int = 5, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's k nearest other features: (cosine [d_sae, k], index [d_sae, k]), nearest first.

    W_dec: [d_sae, d_in]. Memory stays [chunk, d_sae] whatever d_sae is. A feature with a zero
    decoder row has cosine 0 with everything.
    """
    d_sae = W_dec.shape[0]
    k = min(k, d_sae - 1)
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos_out = torch.empty(d_sae, k, device=W_dec.device)
    idx_out = torch.empty(d_sae, k, dtype=torch.int64, device=W_dec.device)
    for a in range(0, d_sae, chunk):
        b = min(a + chunk, d_sae)
        cos = unit[a:b] @ unit.T  # [chunk, d_sae]
        cos[torch.arange(b - a), torch.arange(a, b)] = -torch.inf  # not its own neighbour
        cos_out[a:b], idx_out[a:b] = cos.topk(k, dim=1)
    return cos_out, idx_out


def duplicate_fraction(nearest_cosine: torch.Tensor) -> float:
    """Fraction of features whose nearest neighbour has cosine > DUPLICATE_COSINE; nearest_cosine: [d_sae]."""
    return float((nearest_cosine > DUPLICATE_COSINE).double().mean())
