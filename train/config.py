"""The training configuration, with the seed's names (`LanguageModelSAERunnerConfig`).

Config keys are snake_case; every key is also a `train --kebab-case` flag and may appear in a
`--config` YAML/JSON file. Each field documents its unit (steps, rows or tokens).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shared.errors import UserError
from shared.saes.registry import ARCHITECTURES, architecture_class

ARCHITECTURE_NAMES = tuple(ARCHITECTURES)
SCHEDULERS = ("constant", "constantwithwarmup", "linearwarmupdecay", "cosineannealing",
              "cosineannealingwarmup")
SAMPLING_METHODS = ("anthropic", "l2", "none")
B_DEC_INIT = ("geometric_median", "mean", "zeros")
NORMALIZE = ("none", "expected_norm")


GROUPS = ("data", "sae", "optimizer", "dead_features", "evaluation", "run", "logging")
"""Who owns each setting. `data` settings define the one stream of batches a sweep shares; `run`,
`evaluation` and `logging` settings describe the run as a whole. Only `sae`, `optimizer` and
`dead_features` settings may differ between the SAEs of a sweep."""
SWEEPABLE_GROUPS = ("sae", "optimizer", "dead_features")


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    assert group in GROUPS, group
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class LanguageModelSAERunnerConfig:
    """Everything that defines one SAE training run (the seed's names where the seed had them,
    SAELens' names for the newer architectures' settings).

    Flat on purpose (every key is a flag and a config-file key), with each field's owner in its
    metadata (`GROUPS`); `section(group)` gives one owner's settings. Settings of one architecture
    default to None, meaning "the architecture's default", so that a setting no SAE of a run uses
    can be told apart from one left alone (`train.arch_settings` refuses the former).
    """

    # Data: a dump written by `harvest`; the model/dataset fields say how to harvest it if missing.
    shards: str | None = _f(None, "Dump folder to train from [harvested from model/hook/dataset if absent].", "data")
    model_name: str = _f("gelu-2l", "Model the dump comes from (used to harvest it when missing).", "data")
    hook_point: str = _f("blocks.0.hook_mlp_out", "Hook point (used to harvest the dump when missing).", "data")
    hook_point_layer: int | None = _f(None, "Layer of the hook point (informational; taken from the dump).", "data")
    d_in: int | None = _f(None, "Activation width; checked against the dump when given.", "data")
    dataset_path: str = _f("NeelNanda/c4-tokenized-2b", "Dataset to harvest from when the dump is missing.", "data")
    is_dataset_tokenized: bool = _f(True, "Seed name; harvest detects this itself (kept for compatibility).", "data")
    context_size: int = _f(128, "Tokens per context when harvesting.", "data")
    store_batch_size: int = _f(32, "Contexts per forward pass when harvesting.", "data")
    n_batches_in_buffer: int | None = _f(None, "Seed name; the shuffle buffer is shuffle_buffer_rows now.", "data")
    train_batch_size: int = _f(4096, "Rows (tokens) per optimizer step.", "data")
    total_training_tokens: int | None = _f(None, "Rows to train on [one pass over the dump]; "
                                                 "more means further epochs.", "data")
    normalize_activations: str = _f("none", "none, or expected_norm: scale inputs so E||x|| = sqrt(d_in) "
                                            "(folded back into saved weights).", "data")
    shuffle_buffer_rows: int | None = _f(None, "Rows shuffled together in RAM [about 1 GiB].", "data")
    shuffle_block_rows: int = _f(16, "Contiguous rows read together (smaller mixes better, reads slower).", "data")
    eval_holdout_contexts: int | None = _f(None, "The dump's last contexts kept out of training for "
                                                 "`evaluate` [1% of contexts, at most 512; 0: none].", "data")
    seed: int = _f(42, "Seed of the SAE init, data order and resampling.", "data")
    device: str | None = _f(None, "Device [cuda if available, else cpu].", "data")

    # SAE: the architecture, its size, and the settings of each architecture (SAELens' names)
    architecture: str = _f("standard", "SAE architecture: " + ", ".join(ARCHITECTURE_NAMES) + ".", "sae")
    expansion_factor: int = _f(64, "d_sae = expansion_factor x d_in (unless d_sae is given).", "sae")
    d_sae: int | None = _f(None, "Number of features; overrides expansion_factor.", "sae")
    b_dec_init_method: str = _f("geometric_median", "Decoder bias init: geometric_median, mean or zeros.", "sae")
    decoder_init_norm: float | None = _f(None, "Initial encoder column norm (and decoder row norm where "
                                               "the decoder is free) [0.1].", "sae")
    l1_coefficient: float | None = _f(None, "standard, gated: L1 weight; the L1 term is averaged over the "
                                            "batch (seed value x train_batch_size, e.g. 3e-4 x 4096 = 1.2) "
                                            "[standard 1.2, gated 3].", "sae")
    anthropic_april_update: bool | None = _f(None, "standard: L1 weighted by decoder norms, free decoder, "
                                                   "L1 warm-up and final lr decay (Anthropic, April 2024) [off].", "sae")
    k: int | None = _f(None, "topk, batchtopk, matryoshka_batchtopk: active features per row "
                             "(on average over the batch for batchtopk) [32].", "sae")
    aux_k: int | None = _f(None, "topk family: dead features the AuxK loss reconstructs the residual "
                                 "with [d_in / 2].", "sae")
    aux_loss_coefficient: float | None = _f(None, "topk family: weight of the AuxK loss [1/32].", "sae")
    sparse_decode: bool | None = _f(None, "topk family: decode from the k chosen features per row instead of "
                                          "a dense matmul (same numbers, faster when k is small) "
                                          "[when k x 8 <= d_sae].", "sae")
    topk_threshold_lr: float | None = _f(None, "batchtopk family: rate of the running threshold used at "
                                               "inference [0.01].", "sae")
    matryoshka_widths: list[int] | None = _f(None, "matryoshka_batchtopk: nested prefix widths, comma-separated, "
                                             "ending at d_sae [d_sae/16, d_sae/4, d_sae].", "sae")
    l0_coefficient: float | None = _f(None, "jumprelu: weight of the L0 penalty (averaged over the batch) [1].", "sae")
    jumprelu_bandwidth: float | None = _f(None, "jumprelu: width of the straight-through estimator's kernel [0.05].", "sae")
    jumprelu_init_threshold: float | None = _f(None, "jumprelu: initial threshold of every feature [0.1].", "sae")
    jumprelu_threshold_lr: float | None = _f(None, "jumprelu: Adam learning rate of log(threshold), apart from "
                                                   "lr (slower thresholds cannot keep up) [0.1].", "sae")

    # Optimisation
    lr: float = _f(1e-4, "Adam learning rate.", "optimizer")
    lr_scheduler_name: str = _f("constant", "constant, constantwithwarmup, linearwarmupdecay, "
                                            "cosineannealing or cosineannealingwarmup.", "optimizer")
    lr_warm_up_steps: int = _f(0, "Learning-rate warm-up, in steps.", "optimizer")
    lr_decay_steps: int | None = _f(None, "Linear decay of the learning rate to 0 over the last this many "
                                          "steps, on top of the scheduler [0; 20% with anthropic_april_update].",
                                    "optimizer")
    l1_warm_up_steps: int | None = _f(None, "standard, gated: the L1 coefficient ramps linearly from 0 over "
                                            "this many steps [0; 5% with anthropic_april_update].", "optimizer")
    l0_warm_up_steps: int | None = _f(None, "jumprelu: the L0 coefficient ramps linearly from 0 over this "
                                            "many steps [5% of the steps].", "optimizer")
    dtype: str = _f("float32", "Parameter dtype (float32; use autocast for bfloat16 compute).", "optimizer")
    autocast: bool = _f(False, "bfloat16 autocast for the SAE forward/backward.", "optimizer")

    # Dead features
    feature_sampling_method: str | None = _f(None, "standard: dead-feature resampling: anthropic, l2 or "
                                                   "none [anthropic].", "dead_features")
    feature_sampling_window: int = _f(1000, "Steps between resampling checks and density histograms.",
                                      "dead_features")
    dead_feature_window: int | None = _f(None, "A feature that has not fired for this many steps is dead "
                                              "(resampled by anthropic; reconstructs the residual in AuxK) "
                                              "[500].", "dead_features")
    dead_feature_threshold: float | None = _f(None, "l2: density below this over the sampling window is "
                                                    "dead [1e-8].", "dead_features")
    feature_reinit_scale: float | None = _f(None, "Resampled encoder norm = this x mean alive encoder "
                                                  "norm [0.2].", "dead_features")
    resample_sample_rows: int | None = _f(None, "anthropic: rows on which the loss is measured to pick "
                                                "inputs [819,200].", "dead_features")

    # Evaluation
    evaluate_at_end: bool = _f(False, "Run `evaluate` on the final SAE (held-out rows and, with the "
                                      "language model, CE loss recovered).", "evaluation")

    # Run
    n_checkpoints: int = _f(0, "Evenly spaced checkpoints before the final one.", "run")
    checkpoint_path: str | None = _f(None, "Run folder [data/runs/<run name>].", "run")
    run_name: str | None = _f(None, "Run name [from the architecture, d_sae, its sparsity setting, lr "
                                    "and the dump].", "run")
    log_to_wandb: bool = _f(False, "Also log to Weights & Biases (WANDB_MODE=offline works offline).", "logging")
    wandb_project: str = _f("mats_sae_training_language_models", "wandb project.", "logging")
    wandb_entity: str | None = _f(None, "wandb entity.", "logging")
    wandb_log_frequency: int = _f(10, "Steps between metric logs (the only host syncs).", "logging")

    def __post_init__(self) -> None:
        self.dtype = _dtype_name(self.dtype)
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, str(f.type), getattr(self, f.name)))
        choices = {"lr_scheduler_name": SCHEDULERS, "feature_sampling_method": SAMPLING_METHODS,
                   "b_dec_init_method": B_DEC_INIT, "normalize_activations": NORMALIZE,
                   "dtype": ("float32",), "architecture": ARCHITECTURE_NAMES}
        for name, allowed in choices.items():
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        _check_ranges(self)

    def sae_width(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def default_run_name(self, d_in: int, dump_name: str) -> str:
        """The seed's '<d_sae>-L1-<l1>-LR-<lr>-<dump>' for standard SAEs; other architectures
        say theirs and their sparsity setting ('topk-2048-k-32-LR-...')."""
        settings = architecture_class(self.architecture).settings_from(self.to_dict())
        sparsity = {"l1_coefficient": "L1", "k": "k", "l0_coefficient": "L0"}
        given = [f"{label}-{getattr(settings, key):g}" for key, label in sparsity.items()
                 if hasattr(settings, key)]
        head = [] if self.architecture == "standard" else [self.architecture]
        return "-".join(head + [str(self.sae_width(d_in))] + given[:1] + [f"LR-{self.lr:g}", dump_name])

    def section(self, group: str) -> dict[str, Any]:
        """The settings one owner holds (see GROUPS), e.g. cfg.section("sae")."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; groups: {GROUPS}")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == group}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "LanguageModelSAERunnerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; see `train --help`")
        return cls(**raw)


POSITIVE_INTS = ("expansion_factor", "train_batch_size", "feature_sampling_window", "wandb_log_frequency",
                 "shuffle_block_rows", "context_size", "store_batch_size", "d_in", "total_training_tokens",
                 "shuffle_buffer_rows", "n_batches_in_buffer", "k", "aux_k", "resample_sample_rows",
                 "dead_feature_window")
NON_NEGATIVE_INTS = ("seed", "hook_point_layer", "eval_holdout_contexts", "n_checkpoints", "lr_warm_up_steps",
                     "lr_decay_steps", "l1_warm_up_steps", "l0_warm_up_steps")
POSITIVE_FLOATS = ("lr", "decoder_init_norm", "jumprelu_bandwidth", "jumprelu_init_threshold",
                   "jumprelu_threshold_lr")
NON_NEGATIVE_FLOATS = ("l1_coefficient", "aux_loss_coefficient", "l0_coefficient", "feature_reinit_scale")
FRACTIONS = {"topk_threshold_lr": (False, "(0, 1]"), "dead_feature_threshold": (True, "[0, 1]")}
"""Rates and densities: (whether 0 is allowed, how the range reads)."""
MIN_D_SAE = 2  # a single feature is no dictionary: its density plots and per-feature statistics break


def _check_ranges(cfg: "LanguageModelSAERunnerConfig") -> None:
    """Every number in its range, and finite: an inf lr or a NaN coefficient would otherwise train
    to NaN weights for the whole run. Settings left at None (the architecture's default) pass."""
    def given(names):
        return [(n, getattr(cfg, n)) for n in names if getattr(cfg, n) is not None]

    for name, value in given(POSITIVE_INTS):
        if not value > 0:
            raise UserError(f"{name} must be positive, got {value}")
    for name, value in given(NON_NEGATIVE_INTS):
        if value < 0:
            raise UserError(f"{name} must not be negative, got {value}")
    for name, value in given(POSITIVE_FLOATS):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a positive finite number, got {value}")
    for name, value in given(NON_NEGATIVE_FLOATS):
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{name} must be a finite number >= 0, got {value}")
    for name, value in given(FRACTIONS):
        zero_ok, text = FRACTIONS[name]
        if not (0 <= value <= 1 and (zero_ok or value > 0)):
            raise UserError(f"{name} must be in {text}, got {value}")
    if cfg.d_sae is not None and cfg.d_sae < MIN_D_SAE:
        raise UserError(f"d_sae must be at least {MIN_D_SAE}, got {cfg.d_sae}")


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """Check a value against its field's type, converting what YAML leaves as text.

    PyYAML reads `lr: 1e-4` as the string "1e-4" (YAML 1.1 floats need a dot), so numbers given
    as strings are converted; anything else of the wrong type is a one-line error.
    """
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"{name} cannot be empty")
    kind = annotation.split("|")[0].strip()
    if kind == "list[int]":
        return _int_list(name, value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} must be true or false, got {value!r}")
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise UserError(f"{name} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{name} must be a number, got {value!r}") from None
        if kind == "int":
            if not float(value).is_integer():
                raise UserError(f"{name} must be a whole number, got {value!r}")
            return int(value)
        return float(value)
    if kind == "str" and not isinstance(value, str):
        raise UserError(f"{name} must be text, got {value!r}")
    return value


def _int_list(name: str, value: Any) -> list[int]:
    """'256,1024,4096' (a flag) or [256, 1024, 4096] (a config file) -> [256, 1024, 4096]."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise UserError(f"{name} must be a list of whole numbers such as 256,1024,4096, got {value!r}")
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a list of whole numbers such as 256,1024,4096, got {value!r}") from None
        if isinstance(item, bool) or not number.is_integer():
            raise UserError(f"{name} must be a list of whole numbers such as 256,1024,4096, got {value!r}")
        out.append(int(number))
    return out


def _dtype_name(dtype: Any) -> str:
    """Accept torch dtypes as the seed's config did (dtype=torch.float32)."""
    return re.sub(r"^torch\.", "", str(dtype))
