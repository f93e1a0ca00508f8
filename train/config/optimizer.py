"""The `optimizer` part: Adam, its schedule and the sparsity warm-up."""
from __future__ import annotations

from dataclasses import dataclass

from shared.settings import NON_NEGATIVE, POSITIVE, setting

SCHEDULERS = ("constant", "constantwithwarmup", "linearwarmupdecay", "cosineannealing",
              "cosineannealingwarmup")


@dataclass
class OptimizerPart:
    lr: float = setting(1e-4, POSITIVE)
    """Adam (fused) learning rate."""
    lr_scheduler_name: str = setting("constant", choices=SCHEDULERS)
    """constant, constantwithwarmup, linearwarmupdecay, cosineannealing or cosineannealingwarmup."""
    lr_warm_up_steps: int = setting(0, NON_NEGATIVE)
    """Learning-rate warm-up, in steps."""
    clip_grad_norm: float | None = setting(None, POSITIVE, default_text="none")
    """Clip the total gradient norm over the SAE's parameters to this before each update (SAELens
    clips at 1.0); none: no clipping."""
    lr_decay_steps: int | None = setting(None, NON_NEGATIVE, default_text="0; 20% with anthropic_april_update")
    """Steps over which the learning rate decays linearly to 0 at the end, on top of the scheduler."""
    l1_warm_up_steps: int | None = setting(None, NON_NEGATIVE, default_text="0; 5% with anthropic_april_update")
    """Steps over which the L1 coefficient ramps linearly from 0 (standard, gated)."""
    l0_warm_up_steps: int | None = setting(None, NON_NEGATIVE, default_text="5% of the steps")
    """Steps over which the L0 coefficient ramps linearly from 0 (jumprelu)."""
    autocast: bool = setting(False)
    """bfloat16 autocast for the SAE forward/backward."""
    dtype: str = setting("float32", choices=("float32",), ignored=True)
    """Parameter dtype: float32 only (the seed's name; use autocast for bfloat16 compute)."""
