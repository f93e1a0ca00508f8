"""Which config settings each SAE architecture uses, derived from the architectures themselves.

An architecture uses the fields of its `Settings` dataclass, the warm-up of its sparsity
coefficient, and the dead-feature settings of its policy (resampling or AuxK). A setting that is
given but used by no SAE of a run is refused: a silently ignored `--k` is a wasted sweep.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from shared.errors import UserError
from shared.saes.base import SAE, SAEConfig
from shared.saes.registry import ARCHITECTURES, architecture_class
from shared.saes.settings_base import TARGET_L0
from train.config import MIN_D_SAE, LanguageModelSAERunnerConfig
from train.config.dead_features import policy_settings, resolved_defaults


def used_settings(cls: type[SAE]) -> set[str]:
    """The config settings an SAE of this architecture uses: its own, its sparsity warm-up, and
    the dead-feature settings of its policy."""
    names = {f.name for f in fields(cls.Settings)} | policy_settings(cls.dead_feature_policy)
    return names | ({cls.sparsity_warm_up} if cls.sparsity_warm_up else set())


def specific_settings() -> set[str]:
    """Settings some architectures use and others do not (all default to None in the config)."""
    every = [used_settings(cls) for cls in ARCHITECTURES.values()]
    return set.union(*every) - set.intersection(*every)


def check_settings_used(configs: list[LanguageModelSAERunnerConfig]) -> None:
    """Refuse a setting given (not None) in some config that no SAE of the run uses."""
    architectures = sorted({c.architecture for c in configs})
    used = set().union(*(used_settings(architecture_class(a)) for a in architectures))
    for name in sorted(specific_settings() - used):
        if any(getattr(c, name) is not None for c in configs):
            users = [a for a, cls in ARCHITECTURES.items() if name in used_settings(cls)]
            # No coefficient to steer (no warm-up of one): the sparsity setting fixes L0 itself (k).
            fixed = {a: cls.sparsity_setting for a in architectures
                     if (cls := architecture_class(a)).sparsity_setting and not cls.sparsity_warm_up}
            if name == TARGET_L0 and fixed:
                arch, by = next(iter(fixed.items()))
                raise UserError(f"target_l0 steers the sparsity coefficient of {', '.join(users)}; {arch} fixes L0 "
                                f"by {by} (features kept per row): set {by} instead of target_l0")
            raise UserError(f"{name} is a setting of {', '.join(users)}, but this run trains only "
                            f"{', '.join(architectures)}: drop {name} or set architecture")


def check_shapes(named: list[tuple[str, LanguageModelSAERunnerConfig]], d_in: int, d_out: int | None = None,
                 transcoder: bool = False, n_hooks: int = 1) -> None:
    """Each SAE's settings against its shape (k <= d_sae, matryoshka widths...), before any trains:
    a sweep builds its later memory groups only after the first ones finished training."""
    for name, cfg in named:
        width = cfg.sae_width(d_in)
        prefix = f"{name}: " if len(named) > 1 else ""
        if width < MIN_D_SAE:
            raise UserError(f"{prefix}d_sae must be at least {MIN_D_SAE}, got {width} "
                            f"(expansion_factor {cfg.expansion_factor} x d_in {d_in})")
        try:
            architecture_class(cfg.architecture).settings_from(cfg.to_dict()).validate(
                SAEConfig(d_in, width, d_out, apply_b_dec_to_input=not transcoder, n_hooks=n_hooks))
        except UserError as e:
            raise UserError(f"{prefix}{e}") from None


def without_unused(cfg: LanguageModelSAERunnerConfig) -> dict[str, Any]:
    """The config's values with the settings its own architecture does not use set to None (a
    sweep's grid point then carries only what applies to it)."""
    used = used_settings(architecture_class(cfg.architecture))
    return {k: (None if k in specific_settings() and k not in used else v) for k, v in cfg.to_dict().items()}


def resolved(cfg: LanguageModelSAERunnerConfig, total_steps: int) -> dict[str, Any]:
    """Effective values of the run-level settings left at None: resampling, warm-ups and the lr
    decay (the April 2024 update's L1 warm-up over the first 5% and decay over the last 20%; an
    L0 warm-up over the first 5% for JumpReLU)."""
    april = bool(cfg.anthropic_april_update)
    out: dict[str, Any] = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v
                           for k, v in resolved_defaults().items()}
    cls = architecture_class(cfg.architecture)
    if cls.dead_feature_policy != "resample":
        out["feature_sampling_method"] = "none"
    out["l1_warm_up_steps"] = _or(cfg.l1_warm_up_steps, round(0.05 * total_steps) if april else 0)
    # JumpReLU: a feature that stops firing gets no gradient again, so let the reconstruction
    # settle before the L0 pressure (measured on planted features: fewer dropped features).
    out["l0_warm_up_steps"] = _or(cfg.l0_warm_up_steps, round(0.05 * total_steps))
    out["lr_decay_steps"] = _or(cfg.lr_decay_steps, round(0.2 * total_steps) if april else 0)
    out["sparsity_warm_up_steps"] = out[cls.sparsity_warm_up] if cls.sparsity_warm_up else 0
    return out


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def check_fits(named: list[tuple[str, LanguageModelSAERunnerConfig]], d_in: int, d_out: int, n_hooks: int,
               device: Any) -> None:
    """Refuse, before anything trains, an SAE whose training alone needs more memory than the whole
    device has (a cross-layer transcoder's decoders grow with the square of its layers)."""
    from shared.device import total_bytes

    have = total_bytes(device)
    for name, cfg in named:
        width = cfg.sae_width(d_in)
        need = architecture_class(cfg.architecture).training_bytes(d_in, d_out, width, n_hooks, cfg.train_batch_size)
        if need > have:
            prefix = f"{name}: " if len(named) > 1 else ""
            raise UserError(f"{prefix}training this {cfg.architecture} ({d_in} -> {width} -> {d_out}"
                            + (f" over {n_hooks} hooks" if n_hooks > 1 else "") + f") needs about {need / 1e9:.1f} GB, "
                            f"more than the {have / 1e9:.1f} GB of {device}: use fewer features, fewer layers, a "
                            "smaller train_batch_size, or a larger device")
