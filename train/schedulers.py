"""Learning-rate multipliers (for `torch.optim.lr_scheduler.LambdaLR`) and the L1 warm-up.

Names are the seed's `lr_scheduler_name` values. All step counts are optimizer steps. LambdaLR
evaluates the multiplier at step 0 before the first update, so warm-ups start at 1/warm_up_steps
rather than 0 (a zero learning rate would waste the first step).
"""
from __future__ import annotations

import math
from collections.abc import Callable

from shared.errors import UserError

LrLambda = Callable[[int], float]


def _warm_up(step: int, warm_up_steps: int) -> float:
    """Linear 1/W, 2/W, ..., 1 over the first W steps, then 1."""
    if step >= warm_up_steps:
        return 1.0
    return (step + 1) / warm_up_steps


def _linear_decay(progress: float) -> float:
    """1 at progress 0, 0 at progress >= 1."""
    return max(0.0, 1.0 - progress)


def _cosine_decay(progress: float) -> float:
    """1 at progress 0, 0 at progress >= 1, following half a cosine."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _after_warm_up(decay: Callable[[float], float], total_steps: int, warm_up_steps: int) -> LrLambda:
    """Warm-up, then `decay` over the remaining steps, reaching 0 at `total_steps`."""
    span = max(1, total_steps - warm_up_steps)

    def multiplier(step: int) -> float:
        if step < warm_up_steps:
            return _warm_up(step, warm_up_steps)
        return decay((step - warm_up_steps) / span)

    return multiplier


def _builders(total_steps: int, warm_up_steps: int) -> dict[str, LrLambda]:
    return {
        "constant": lambda step: 1.0,
        "constantwithwarmup": lambda step: _warm_up(step, warm_up_steps),
        "linearwarmupdecay": _after_warm_up(_linear_decay, total_steps, warm_up_steps),
        "cosineannealing": lambda step: _cosine_decay(step / total_steps),
        "cosineannealingwarmup": _after_warm_up(_cosine_decay, total_steps, warm_up_steps),
    }


SCHEDULER_NAMES = tuple(_builders(1, 0))


def make_lr_lambda(name: str, total_steps: int, warm_up_steps: int = 0, decay_steps: int = 0) -> LrLambda:
    """The multiplier of the base learning rate at each optimizer step, for LambdaLR.

    `decay_steps` > 0 multiplies it by a linear ramp from 1 to 0 over the last `decay_steps`
    steps, whatever the scheduler (Anthropic's April 2024 update decays over the last 20%).
    """
    if name not in SCHEDULER_NAMES:
        raise UserError(f"unknown lr scheduler '{name}'; valid names: {', '.join(SCHEDULER_NAMES)}")
    if total_steps <= 0:
        raise UserError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warm_up_steps <= total_steps:
        raise UserError(f"warm_up_steps must be in [0, total_steps={total_steps}], got {warm_up_steps}")
    if not 0 <= decay_steps <= total_steps:
        raise UserError(f"lr_decay_steps must be in [0, total_steps={total_steps}], got {decay_steps}")
    base = _builders(total_steps, warm_up_steps)[name]
    if decay_steps == 0:
        return base
    decay_start = total_steps - decay_steps

    def with_decay(step: int) -> float:
        return base(step) * min(1.0, max(0.0, (total_steps - step) / decay_steps)) if step >= decay_start else base(step)

    return with_decay


def sparsity_warmup_factor(step: int, warm_up_steps: int) -> float:
    """Multiplier of the sparsity coefficient (L1 or L0): linear from 0 at step 0 to 1 at
    `warm_up_steps`.

    Starting at 0 is deliberate (unlike the lr warm-up): the first steps then fit the
    reconstruction before sparsity pressure starts (Anthropic's April 2024 update).
    """
    if warm_up_steps <= 0:
        return 1.0
    return min(1.0, step / warm_up_steps)


l1_warmup_factor = sparsity_warmup_factor  # the name earlier versions used
