"""The `jumprelu` architecture's settings (torch-free, for flags and configs; see `jumprelu`)."""
from __future__ import annotations

from dataclasses import dataclass

from shared.saes.settings_base import TargetL0Settings
from shared.settings import NON_NEGATIVE, POSITIVE, setting


@dataclass
class JumpReLUSettings(TargetL0Settings):
    l0_coefficient: float = setting(1.0, NON_NEGATIVE)
    """Weight of the L0 term (mean over rows of the number of firing features) against the MSE,
    which is summed over d_in; set for inputs normalised to E||x|| = sqrt(d_in). A feature is
    worth firing on a row when it removes more than l0_coefficient of squared error there; a
    typical feature explains about d_in / L0 of ||x||^2 (~15 for d_in = 768, L0 = 50). Raise it
    for a lower L0. (SAELens' default; the paper's lambda, on inputs of unit mean squared norm, is
    this divided by d_in.) On planted features (3 per row, each ~d_in / 3 of ||x||^2): 1.0 found
    the planted L0; 0.3 kept L0 ~5 with split features; 3.0 dropped the weakest at d_in = 16."""
    jumprelu_bandwidth: float = setting(0.05, POSITIVE)
    """Width eps of the straight-through estimators' rectangle kernel, in pre-activation units
    (SAELens' default; the paper's 0.001 is for inputs of unit mean squared norm, ~0.001 *
    sqrt(d_in) here). Only pre-activations within eps/2 of a threshold move it: wider means less
    noise and more bias. On planted features 0.05 to 0.5 all worked (0.2-0.5 slightly better
    with small batches); the initial threshold mattered far more."""
    jumprelu_init_threshold: float = setting(0.1, POSITIVE)
    """Initial threshold theta of every feature (pre-activation units): about the spread of the
    first pre-activations (decoder_init_norm x ||x - b_dec|| / sqrt(d_in) ~ 0.1 on normalised
    inputs), so each feature starts firing on a fair share of inputs (~16%) and sparsity is
    learnt from the start. Much smaller stalls: Adam moves log_threshold by at most ~lr per
    step, so theta's absolute rate is ~theta * lr, and the encoder learns a dense code faster
    than the L0 term raises thresholds; when they catch up, features die rather than
    reorganise (a feature that never fires gets no gradient). Measured on planted features
    (1500 steps at lr 3e-3, or 4000 at 1e-3): from 0.01 (SAELens' default) L0 ended ~40 of 64,
    from 0.03 ~13, both with mean max cosine 0.54-0.62; from 0.1 L0 reached the planted 3 and
    the cosine 0.87-0.99 (and >= 0.988 over 6 seeds at lr 1e-2 for 400 steps, with the L0
    coefficient warmed up over the first 100)."""

    jumprelu_threshold_lr: float = setting(0.1, POSITIVE)
    """Adam learning rate of log(threshold), whatever the other parameters' lr (the lr schedule
    still scales it). Adam moves log_threshold by ~its lr per step at most, i.e. theta by a
    factor e^lr: at the usual SAE lr (1e-3) a threshold needs ~2,000 steps to grow e^2-fold,
    while the encoder's pre-activations grow in a few hundred, so the L0 term cannot keep up and
    L0 ignores its coefficient. Measured on SmolLM2-135M's layer-5 MLP output (576 -> 2304, 196
    steps at lr 1e-3, l0_coefficient 2 to 12): threshold lr 1e-3 gave L0 ~1,270 whatever the
    coefficient; 1e-2, L0 ~130; 0.1, L0 following the coefficient (2 -> 33, 12 -> 3.4), with
    explained variance at L0 33 (0.65) equal to TopK's at k 32. On planted features 0.1 also
    works (lr 1e-2); 1.0 does not."""
