"""Steering the sparsity coefficient toward a target L0 (`target_l0`, standard / gated / jumprelu).

A proportional-integral controller on the coefficient's log, toward a target that glides down to
`target_l0`: after each step

    ema   <- ema + EMA_RATE * (L0_batch - ema)           (the first controlled step: ema = L0_batch)
    goal  =  target * (L0_start / target) ** (1 - s)     s = min(1, steps controlled / glide steps)
    e     =  clamp(log(ema / goal), -MAX_ERROR, MAX_ERROR)
    I     <- I + GAIN * e
    log m =  I + PROPORTIONAL * e

and the next step's coefficient is `configured coefficient x warm-up factor x m` (m starts at 1: the
configured coefficient is the starting point). L0 too high raises the coefficient, too low lowers
it, and it stops moving once L0 sits at the target; the log makes each step a relative change, the
same whatever the coefficient's scale (L1 or L0, any layer). The controller acts only from the end
of the sparsity warm-up: while the warm-up factor holds the coefficient down, L0 is high by design
and an integrator would wind up and overshoot once the factor reaches 1.

The glide: a fresh SAE fires on about half its features, and its L0 falls by itself as it trains.
Compared with the final target from the first step, that fall reads as a large error for tens of
steps, the integral winds up, and L0 then crashes far below the target and takes as long again to
come back (measured: JumpReLU at target 100 fell to 8 and swung up to 170 over a 196-step run).
So the controller follows a goal that starts at the first controlled step's L0 (L0_start) and
glides geometrically (linearly in log L0) to the target over the first GLIDE_FRACTION of the
controlled steps, then stays at it: the error stays small, and the coefficient rises only as fast
as the SAE can follow. docs/architectures.md (target L0) has the measurement.

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
GLIDE_FRACTION = 0.25
"""Share of the controlled steps over which the goal glides from L0_start down to the target."""
TENSORS = ("log_multiplier", "integral", "l0_ema", "log_l0_start")
"""The state a checkpoint keeps, as `sparsity_control.<name>`."""
OPTIONAL = {"log_l0_start"}
"""Tensors a checkpoint of an earlier version lacks (written before the glide): such a run resumes
with its goal at the target, as it was trained."""


class SparsityControl:
    """The controller of one SAE: target L0, first controlled step, and its state on the device."""

    def __init__(self, target: float, start_step: int, device: torch.device, total_steps: int = 0) -> None:
        self.target = float(target)
        self.start_step = start_step
        """The first step with the full coefficient (the warm-up's end): the controller acts from it."""
        self.glide_steps = max(1, round(GLIDE_FRACTION * (total_steps - start_step)))
        """Steps from the start over which the goal glides to the target (at least 1)."""
        self.log_l0_start = torch.full((), math.log(self.target), dtype=torch.float32, device=device)
        """log L0 at the first controlled step (set there): where the goal's glide begins."""
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
            self.log_l0_start.copy_(self.l0_ema.clamp_min(EPS).log())
        else:
            self.l0_ema.lerp_(l0.to(self.l0_ema.dtype), EMA_RATE)
        error = (self.l0_ema.clamp_min(EPS).log() - self.log_goal(step)).clamp(-MAX_ERROR, MAX_ERROR)
        self.integral.add_(GAIN * error)
        torch.add(self.integral, error, alpha=PROPORTIONAL, out=self.log_multiplier)

    def log_goal(self, step: int) -> torch.Tensor:
        """log of the L0 aimed at after step `step`: L0_start gliding to the target, then the target.
        A start below the target has nothing to glide down: the goal is the target from the first step."""
        left = max(0.0, 1.0 - (step - self.start_step) / self.glide_steps)
        log_target = math.log(self.target)
        return log_target + left * (self.log_l0_start - log_target).clamp_min(0.0)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS}

    def load_(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in TENSORS:
            if name in tensors:
                getattr(self, name).copy_(tensors[name])
            elif name in OPTIONAL:  # an earlier version's checkpoint: no glide
                getattr(self, name).fill_(math.log(self.target))
            else:
                raise KeyError(f"sparsity_control.{name}")
