"""Dead-feature resampling: give features that stopped firing a new direction, in place.

Source: Towards Monosemanticity (Anthropic 2023), "Neuron Resampling". Draw one input per dead
feature with probability proportional to its squared reconstruction loss (inputs the SAE explains
worst), point the feature's decoder row at that input (minus b_dec), give the encoder a small copy
of the same direction, zero its bias, and reset its Adam moments.

Only the dead features' rows/columns/entries of W_dec, W_enc, b_enc and of their Adam moments are
written; every other number (alive features, b_dec, Adam step counts) stays bit-for-bit the same.
Which features count as dead, and over which window, is the caller's decision.
"""
from __future__ import annotations

import torch

from shared.sae import SparseAutoencoder

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@torch.no_grad()
def per_row_reconstruction_loss(sae: SparseAutoencoder, inputs: torch.Tensor,
                                chunk_rows: int = 8192, targets: torch.Tensor | None = None) -> torch.Tensor:
    """||t - x_hat||^2 per row, in chunks (inputs may be large and live on the CPU).

    inputs: [n, d_in], targets: [n, d_out] (None: the inputs, as for an SAE), any float dtype,
    any device -> [n] float32 on the SAE's device.
    """
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    losses = []
    for start in range(0, inputs.shape[0], chunk_rows):
        x = inputs[start:start + chunk_rows].to(device=device, dtype=dtype)
        t = x if targets is None else targets[start:start + chunk_rows].to(device=device, dtype=dtype)
        losses.append((t - sae(x).sae_out).pow(2).sum(dim=-1).float())
    return torch.cat(losses)


def sample_by_loss_squared(losses: torch.Tensor, n: int, generator: torch.Generator | None,
                           replacement: bool) -> torch.Tensor:
    """n row indices drawn with probability proportional to losses^2. losses: [rows] -> [n].

    Without replacement unless asked, or unless fewer rows have non-zero loss than draws needed
    (torch.multinomial cannot draw more distinct rows than that). A zero loss everywhere falls back
    to uniform draws. The generator must live on the device of `losses`.
    """
    weights = losses.to(torch.float64).pow(2)  # float64: loss^4-scale ratios underflow in float32
    if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0.0:
        weights = torch.ones_like(weights)
    replacement = replacement or n > int((weights > 0).sum())
    return torch.multinomial(weights, n, replacement=replacement, generator=generator)


@torch.no_grad()
def reinit_features_(sae: SparseAutoencoder, dead: torch.Tensor, replacement_inputs: torch.Tensor,
                     feature_reinit_scale: float, replacement_targets: torch.Tensor | None = None) -> None:
    """Point the features `dead` (indices [n_dead]) at `replacement_inputs` [n_dead, d_in].

    An SAE's feature reads and writes the input's direction x - b_dec. A transcoder's
    (`replacement_targets` [n_dead, d_out] given) reads the input's direction x and writes what
    the features must explain of its target, t - b_dec - skip(x).
    The encoder scale is relative to the alive features' mean encoder-column norm (1.0 if none is
    alive), so a reborn feature starts weak and does not grab inputs from established features.
    """
    alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=dead.device)
    alive[dead] = False
    x = replacement_inputs.to(sae.W_dec.dtype)
    reads = _unit_rows(sae.encoder_input(x))  # [n_dead, d_in]
    if sae.cfg.transcoder and replacement_targets is not None:
        writes = _unit_rows(replacement_targets.to(sae.W_dec.dtype) - sae.b_dec - sae.skip(x))  # [n_dead, d_out]
    else:
        writes = reads
    alive_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else 1.0
    sae.W_dec[dead] = writes
    sae.W_enc[:, dead] = (reads * (feature_reinit_scale * alive_norm)).T
    sae.b_enc[dead] = 0.0


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def reset_adam_moments_(optimizer: torch.optim.Optimizer, sae: SparseAutoencoder, dead: torch.Tensor) -> None:
    """Zero Adam's moments of the features `dead` (indices [n_dead]) in W_dec, W_enc and b_enc.

    State is found by parameter object, never by position in the optimizer's param list. The step
    counts stay: they are shared by a whole tensor, not per feature. Before the first step the
    state is empty and there is nothing to reset.
    """
    feature_slices = ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,)))
    for param, index in feature_slices:
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in _ADAM_MOMENTS:
            if key in state:
                state[key][index] = 0.0


def _dead_indices(sae: SparseAutoencoder, dead_mask: torch.Tensor) -> torch.Tensor:
    if dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (sae.cfg.d_sae,):
        raise ValueError(f"dead_mask must be a bool [d_sae={sae.cfg.d_sae}] tensor, "
                         f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
    return torch.nonzero(dead_mask.to(sae.W_dec.device)).squeeze(-1)


def _resample_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_mask: torch.Tensor,
               inputs: torch.Tensor, feature_reinit_scale: float, generator: torch.Generator | None,
               replacement: bool, targets: torch.Tensor | None = None) -> int:
    dead = _dead_indices(sae, dead_mask)
    n_dead = int(dead.numel())
    if n_dead == 0:
        return 0
    losses = per_row_reconstruction_loss(sae, inputs, targets=targets)
    rows = sample_by_loss_squared(losses, n_dead, generator, replacement)
    picked = rows.to(inputs.device)
    chosen = inputs[picked].to(sae.W_dec.device)
    chosen_targets = None if targets is None else targets[picked].to(sae.W_dec.device)
    reinit_features_(sae, dead, chosen, feature_reinit_scale, chosen_targets)
    reset_adam_moments_(optimizer, sae, dead)
    return n_dead


def resample_anthropic_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_mask: torch.Tensor,
                        inputs: torch.Tensor, feature_reinit_scale: float = 0.2,
                        generator: torch.Generator | None = None, targets: torch.Tensor | None = None) -> int:
    """Resample the dead features from a large random sample of inputs (paper: 819,200 rows).

    dead_mask: [d_sae] bool; inputs: [n, d_in], on any device (moved to the SAE in chunks);
    targets: [n, d_out] the losses are measured against (None: the inputs);
    generator: on the SAE's device. Draws distinct inputs whenever enough inputs have non-zero
    loss. Returns the number of features resampled.
    """
    return _resample_(sae, optimizer, dead_mask, inputs, feature_reinit_scale, generator, replacement=False,
                      targets=targets)


def resample_l2_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, dead_mask: torch.Tensor,
                 inputs: torch.Tensor, feature_reinit_scale: float = 0.2,
                 generator: torch.Generator | None = None, targets: torch.Tensor | None = None) -> int:
    """The seed's `l2` resampler: inputs (and targets, None for an SAE) come from the current
    training batch only.

    dead_mask: [d_sae] bool (the seed: density below `dead_feature_threshold` over
    `dead_feature_window`); inputs: [batch, d_in]; generator: on the SAE's device. Like the seed,
    draws with replacement: a batch is often smaller than the number of dead features, so the
    same input may seed several features. Returns the number of features resampled.
    """
    return _resample_(sae, optimizer, dead_mask, inputs, feature_reinit_scale, generator, replacement=True,
                      targets=targets)
