"""What every architecture's settings build on, without torch: the SAE's shape (`SAEConfig`) and
the settings all architectures share (`BaseSettings`).

An architecture's `Settings` live in its own torch-free `<architecture>_settings.py` beside it, so
that `train --help` and the config can list them without importing torch (`shared.saes.registry`).
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.errors import UserError
from shared.settings import POSITIVE, check_fields, setting


@dataclass
class SAEConfig:
    """Shape of an SAE; how it is trained is the architecture's `Settings` and the caller's config."""

    d_in: int
    """Width of the activations it reads (the hook point's d_model)."""
    d_sae: int
    """Number of features (dictionary size)."""
    d_out: int | None = None
    """Width of the target it writes; None means d_in (an SAE reconstructs its input)."""
    n_hooks: int = 1
    """Hooks the input concatenates, each of d_in / n_hooks (and the target, of d_out / n_hooks):
    a crosscoder's hooks or a cross-layer transcoder's layers, in order; 1 for every other."""
    apply_b_dec_to_input: bool = True
    """Whether the encoder reads x - b_dec (an SAE: b_dec lives in the input's space) or x itself
    (a transcoder, whose b_dec lives in the target's space; SAELens' name for the switch)."""

    def __post_init__(self) -> None:
        if self.d_out is None:
            self.d_out = self.d_in
        for name in ("d_in", "d_sae", "d_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"SAE {name} must be a positive integer, got {value!r}")
        n = self.n_hooks
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"SAE n_hooks must be a positive integer, got {n!r}")
        if self.d_in % n or self.d_out % n:
            raise UserError(f"{n} hooks of equal width cannot make d_in {self.d_in} and d_out {self.d_out}: "
                            "concatenate hooks of one width a side")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise UserError(f"apply_b_dec_to_input must be true or false, got {self.apply_b_dec_to_input!r}")

    @property
    def transcoder(self) -> bool:
        """Whether it writes another space than it reads (input and target from different hooks)."""
        return not self.apply_b_dec_to_input

    def saved_shape(self) -> dict[str, int]:
        """The shape keys cfg.json holds: d_in and d_sae, plus d_out only where it differs from
        d_in (SAELens' config of a plain SAE has no d_out; its transcoders have one)."""
        shape = {"d_in": self.d_in, "d_sae": self.d_sae}
        if self.d_out != self.d_in:
            shape["d_out"] = self.d_out
        if self.n_hooks != 1:
            shape["n_hooks"] = self.n_hooks
        return shape


@dataclass
class BaseSettings:
    """Settings every architecture has. Subclasses add their own, named as in SAELens."""

    skip_connection: bool = setting(False)
    """Transcoders only: add a linear path from input to target, out = decode(f) + x @ W_skip.T,
    with W_skip [d_out, d_in] starting at zero (the skip transcoder of Paulo et al. 2025). Needs a
    target dump (--target-shards)."""
    decoder_init_norm: float = setting(0.1, POSITIVE)
    """Initial norm of each feature's encoder column (W_enc = decoder_init_norm x the feature's
    direction), and of its decoder row where the decoder is not held at unit norm. A small encoder
    keeps the first pre-activations small, so features start near their threshold instead of
    firing on most inputs (SAELens' default 0.1; Anthropic's April 2024 update)."""

    def validate(self, cfg: SAEConfig) -> None:
        """Every setting of its type and in its declared range; subclasses add what depends on the
        shape (k <= d_sae)."""
        check_fields(self)
        if self.skip_connection and not cfg.transcoder:
            raise UserError("skip_connection adds a path from the input to another hook's activations: it needs "
                            "a target dump (--target-shards); an SAE reconstructs its own input")


TARGET_L0 = "target_l0"
"""The name of `TargetL0Settings.target_l0` (for the config's checks, which must not spell it)."""


@dataclass
class TargetL0Settings(BaseSettings):
    """The settings of an architecture whose sparsity is a coefficient (L1 or L0) that training can
    steer toward a target L0 (`train.sparsity_control`)."""

    target_l0: float | None = setting(None, POSITIVE)
    """Held-out L0 to reach (features firing per row): the sparsity coefficient is steered during
    training, starting from its configured value, so that L0 ends at this (None: the coefficient
    stays as configured). A controller on the coefficient's log (`train.sparsity_control`) acts
    from the end of the sparsity warm-up; the coefficient's path is logged as
    `sparsity_coefficient`."""

    def validate(self, cfg: SAEConfig) -> None:
        super().validate(cfg)
        if self.target_l0 is not None and not self.target_l0 < cfg.d_sae:
            raise UserError(f"target_l0 must be below d_sae ({cfg.d_sae}, the features there are), got {self.target_l0:g}")
