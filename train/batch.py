"""One training batch: what the dictionary reads (input) and what it must reconstruct (target).

For an SAE both are the same tensor (one dump); for a transcoder or crosscoder they are the same
rows of two dumps written by one harvest pass (`train.loader.AlignedLoader`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Batch(NamedTuple):
    input: torch.Tensor
    """[batch, d_in]: the activations the encoder reads."""
    target: torch.Tensor
    """[batch, d_out]: the activations the decoder reconstructs (`input` itself for an SAE)."""

    @classmethod
    def of(cls, data: "torch.Tensor | Batch | Sequence[torch.Tensor]") -> "Batch":
        """A Batch from a tensor (an SAE's: input and target are that one tensor), a Batch, or an
        (input, target) pair as an aligned loader yields it."""
        if isinstance(data, Batch):
            return data
        if isinstance(data, torch.Tensor):
            return cls(data, data)
        input_, target = data
        return cls(input_, target)

    @property
    def same(self) -> bool:
        """Whether the target is the input itself (an SAE's batch)."""
        return self.target is self.input

    def scaled(self, input_scale: float, target_scale: float) -> "Batch":
        """Each side times its scale; a scale of 1.0 leaves its tensor as it is, and an SAE's
        batch stays one tensor (its two scales are equal)."""
        x = self.input * input_scale if input_scale != 1.0 else self.input
        if self.same and input_scale == target_scale:
            return Batch(x, x)
        t = self.target * target_scale if target_scale != 1.0 else self.target
        return Batch(x, t)

    def rows(self, lo: int, hi: int) -> "Batch":
        """Rows [lo, hi) of both sides, an SAE's still one tensor."""
        x = self.input[lo:hi]
        return Batch(x, x) if self.same else Batch(x, self.target[lo:hi])
