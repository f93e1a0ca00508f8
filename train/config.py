"""The training configuration, with the seed's names (`LanguageModelSAERunnerConfig`).

Config keys are snake_case; every key is also a `train --kebab-case` flag and may appear in a
`--config` YAML/JSON file. Each field documents its unit (steps, rows or tokens).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shared.errors import UserError

SCHEDULERS = ("constant", "constantwithwarmup", "linearwarmupdecay", "cosineannealing",
              "cosineannealingwarmup")
SAMPLING_METHODS = ("anthropic", "l2", "none")
B_DEC_INIT = ("geometric_median", "mean", "zeros")
NORMALIZE = ("none", "expected_norm")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LanguageModelSAERunnerConfig:
    """Everything that defines one SAE training run (the seed's names where the seed had them)."""

    # Data: a dump written by `harvest`; the model/dataset fields say how to harvest it if missing.
    shards: str | None = _f(None, "Dump folder to train from [harvested from model/hook/dataset if absent].")
    model_name: str = _f("gelu-2l", "Model the dump comes from (used to harvest it when missing).")
    hook_point: str = _f("blocks.0.hook_mlp_out", "Hook point (used to harvest the dump when missing).")
    hook_point_layer: int | None = _f(None, "Layer of the hook point (informational; taken from the dump).")
    d_in: int | None = _f(None, "Activation width; checked against the dump when given.")
    dataset_path: str = _f("NeelNanda/c4-tokenized-2b", "Dataset to harvest from when the dump is missing.")
    is_dataset_tokenized: bool = _f(True, "Seed name; harvest detects this itself (kept for compatibility).")
    context_size: int = _f(128, "Tokens per context when harvesting.")
    store_batch_size: int = _f(32, "Contexts per forward pass when harvesting.")
    n_batches_in_buffer: int | None = _f(None, "Seed name; the shuffle buffer is shuffle_buffer_rows now.")

    # SAE
    expansion_factor: int = _f(64, "d_sae = expansion_factor x d_in (unless d_sae is given).")
    d_sae: int | None = _f(None, "Number of features; overrides expansion_factor.")
    b_dec_init_method: str = _f("geometric_median", "Decoder bias init: geometric_median, mean or zeros.")
    normalize_activations: str = _f("none", "none, or expected_norm: scale inputs so E||x|| = sqrt(d_in) "
                                            "(folded back into saved weights).")

    # Optimisation
    lr: float = _f(1e-4, "Adam learning rate.")
    l1_coefficient: float = _f(1.2, "L1 weight; the L1 term is averaged over the batch "
                                    "(seed value x train_batch_size, e.g. 3e-4 x 4096 = 1.2).")
    lr_scheduler_name: str = _f("constant", "constant, constantwithwarmup, linearwarmupdecay, "
                                            "cosineannealing or cosineannealingwarmup.")
    lr_warm_up_steps: int = _f(0, "Learning-rate warm-up, in steps.")
    l1_warm_up_steps: int = _f(0, "L1 coefficient ramps linearly from 0 over this many steps.")
    train_batch_size: int = _f(4096, "Rows (tokens) per optimizer step.")
    total_training_tokens: int | None = _f(None, "Rows to train on [one pass over the dump]; "
                                                 "more means further epochs.")
    dtype: str = _f("float32", "Parameter dtype (float32; use autocast for bfloat16 compute).")
    autocast: bool = _f(False, "bfloat16 autocast for the SAE forward/backward.")

    # Dead features
    feature_sampling_method: str = _f("anthropic", "Dead-feature resampling: anthropic, l2 or none.")
    feature_sampling_window: int = _f(1000, "Steps between resampling checks and density histograms.")
    dead_feature_window: int = _f(500, "anthropic: a feature that has not fired for this many steps is dead.")
    dead_feature_threshold: float = _f(1e-8, "l2: density below this over the sampling window is dead.")
    feature_reinit_scale: float = _f(0.2, "Resampled encoder norm = this x mean alive encoder norm.")
    resample_sample_rows: int = _f(819_200, "anthropic: rows on which the loss is measured to pick inputs.")

    # Loader
    shuffle_buffer_rows: int | None = _f(None, "Rows shuffled together in RAM [about 1 GiB].")
    shuffle_block_rows: int = _f(16, "Contiguous rows read together (smaller mixes better, reads slower).")

    # Evaluation
    eval_holdout_contexts: int | None = _f(None, "The dump's last contexts kept out of training for "
                                                 "`evaluate` [1% of contexts, at most 512; 0: none].")
    evaluate_at_end: bool = _f(False, "Run `evaluate` on the final SAE (held-out rows and, with the "
                                      "language model, CE loss recovered).")

    # Run
    seed: int = _f(42, "Seed of the SAE init, data order and resampling.")
    device: str | None = _f(None, "Device [cuda if available, else cpu].")
    n_checkpoints: int = _f(0, "Evenly spaced checkpoints before the final one.")
    checkpoint_path: str | None = _f(None, "Run folder [data/runs/<run name>].")
    run_name: str | None = _f(None, "Run name [from d_sae, l1_coefficient, lr and the dump].")
    log_to_wandb: bool = _f(False, "Also log to Weights & Biases (WANDB_MODE=offline works offline).")
    wandb_project: str = _f("mats_sae_training_language_models", "wandb project.")
    wandb_entity: str | None = _f(None, "wandb entity.")
    wandb_log_frequency: int = _f(10, "Steps between metric logs (the only host syncs).")

    def __post_init__(self) -> None:
        self.dtype = _dtype_name(self.dtype)
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, str(f.type), getattr(self, f.name)))
        choices = {"lr_scheduler_name": SCHEDULERS, "feature_sampling_method": SAMPLING_METHODS,
                   "b_dec_init_method": B_DEC_INIT, "normalize_activations": NORMALIZE,
                   "dtype": ("float32",)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        positive = ["expansion_factor", "lr", "train_batch_size", "feature_sampling_window",
                    "dead_feature_window", "resample_sample_rows", "wandb_log_frequency",
                    "shuffle_block_rows", "context_size", "store_batch_size"]
        positive += [n for n in ("d_sae", "d_in", "total_training_tokens", "shuffle_buffer_rows")
                     if getattr(self, n) is not None]
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("l1_coefficient", "lr_warm_up_steps", "eval_holdout_contexts", "l1_warm_up_steps", "n_checkpoints",
                     "feature_reinit_scale", "dead_feature_threshold"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")

    def sae_width(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def default_run_name(self, d_in: int, dump_name: str) -> str:
        return f"{self.sae_width(d_in)}-L1-{self.l1_coefficient:g}-LR-{self.lr:g}-{dump_name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "LanguageModelSAERunnerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; see `train --help`")
        return cls(**raw)


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


def _dtype_name(dtype: Any) -> str:
    """Accept torch dtypes as the seed's config did (dtype=torch.float32)."""
    return re.sub(r"^torch\.", "", str(dtype))
