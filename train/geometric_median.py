"""Geometric median of activations: a robust starting point for b_dec.

Why the median and not the mean: a few huge-norm activations (e.g. BOS tokens) pull the mean far
from where most rows lie; the geometric median (the point minimising the sum of Euclidean
distances) barely moves. Initialising b_dec there is what Towards Monosemanticity (Anthropic 2023)
and the seed do.
"""
from __future__ import annotations

import torch

_EPS = 1e-8


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm, in float64, starting from the mean.

    points: [n, d] -> [d], in the dtype and device of `points`. Stops when an update moves the
    estimate by less than `tol` times the points' mean distance to the mean (scale-free). Holds a
    float64 copy of `points`: pass a subsample (tens of thousands of rows are plenty).
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be [n, d] with n > 0, got shape {tuple(points.shape)}")
    x = points.to(torch.float64)
    median = x.mean(dim=0)
    scale = (x - median).norm(dim=1).mean().clamp_min(_EPS)
    for _ in range(max_iter):
        new = _weiszfeld_step(x, median)
        moved = (new - median).norm()
        median = new
        if moved <= tol * scale:
            break
    return median.to(points.dtype)


def _weiszfeld_step(x: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    """One re-weighted mean: weights 1/distance, with distances floored so a point at the
    current estimate cannot divide by zero. x: [n, d], median: [d] -> [d]."""
    weights = 1.0 / (x - median).norm(dim=1).clamp_min(_EPS)  # [n]
    return (weights[:, None] * x).sum(dim=0) / weights.sum()
