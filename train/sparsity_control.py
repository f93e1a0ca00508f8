"""Steering the sparsity coefficient toward a target L0 (`target_l0`, standard / gated / jumprelu).

An integral controller on the coefficient's log: after each step

    ema   <- ema + EMA_RATE * (L0_batch - ema)           (the first controlled step: ema = L0_batch)
    e     =  clamp(log(ema / target), -MAX_ERROR, MAX_ERROR)
    I     <- I + GAIN * e
    log m =  I + PROPORTIONAL * e

and the next step's coefficient is `configured coefficient x warm-up factor x m` (m starts at 1: the
configured coefficient is the starting point). L0 too high raises the coefficient, too low lowers
it, and it stops moving once L0 sits at the target; the log makes each step a relative change, the
same whatever the coefficient's scale (L1 or L0, any layer). The controller acts only from the end
of the sparsity warm-up: while the warm-up factor holds the coefficient down, L0 is high by design
and an integrator would wind up and overshoot once the factor reaches 1.

L0_batch is the step's own measurement (`train.step.StepResult.l0`, the whole batch's in a
data-parallel run), and every operation stays on the device: steering costs no host sync. The state
(m and the EMA) is two float32 scalars saved with the trainer state, so a resume continues exactly.
"""
from __future__ import annotations

import math

import torch

GAIN = 0.05
"""Change of log m per step per unit of log(L0 / target): see docs/architectures.md (target L0)
for the measurement that chose it."""
EMA_RATE = 0.2
"""Weight of each batch's L0 in the running estimate the controller compares with the target."""
MAX_ERROR = 1.0
"""Largest |log(L0 / target)| acted on: far from the target (the dense start) the coefficient grows
by at most e^GAIN per step, so that it does not overshoot while the SAE is still catching up."""
EPS = 1e-3
"""Floor of the EMA before its log (an L0 of 0: the coefficient then falls at the largest rate)."""
PROPORTIONAL = 1.0
"""Weight of the current error beside its integral (damping: a falling L0 eases the coefficient at once)."""
TENSORS = ("log_multiplier", "integral", "l0_ema")
"""The state a checkpoint keeps, as `sparsity_control.<name>`."""


class SparsityControl:
    """The controller of one SAE: target L0, first controlled step, and its state on the device."""

    def __init__(self, target: float, start_step: int, device: torch.device) -> None:
        self.target = float(target)
        self.start_step = start_step
        """The first step with the full coefficient (the warm-up's end): the controller acts from it."""
        self.log_multiplier = torch.zeros((), dtype=torch.float32, device=device)
        self.integral = torch.zeros((), dtype=torch.float32, device=device)
        self.l0_ema = torch.zeros((), dtype=torch.float32, device=device)

    def multiplier(self) -> torch.Tensor:
        """m = exp(log m): the factor on the configured (and warmed-up) coefficient, a scalar tensor."""
        return self.log_multiplier.exp()

    @torch.no_grad()
    def update_(self, l0: torch.Tensor, step: int) -> None:
        """After step `step` (counters.step before it was counted), which measured L0 `l0`."""
        if step < self.start_step:
            return
        if step == self.start_step:
            self.l0_ema.copy_(l0)
        else:
            self.l0_ema.lerp_(l0.to(self.l0_ema.dtype), EMA_RATE)
        error = (self.l0_ema.clamp_min(EPS).log() - math.log(self.target)).clamp(-MAX_ERROR, MAX_ERROR)
        self.integral.add_(GAIN * error)
        torch.add(self.integral, error, alpha=PROPORTIONAL, out=self.log_multiplier)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS}

    def load_(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in TENSORS:
            getattr(self, name).copy_(tensors[name])
