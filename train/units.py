"""Which space each printed figure is in, named the same in the training bar, metrics.jsonl,
eval.json and the lines the commands print.

Training may normalise activations (`normalize_activations=expected_norm`: x_train = x_raw *
scale, scale = sqrt(d_in) / E||x_raw||), so its squared errors are in that space; a squared error
in raw units is the training one / scale^2. Saved SAEs read raw activations, so everything
`evaluate` reports (eval.json) is in raw units.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

EVAL_UNITS = "raw activations"
"""eval.json's `units`: its squared errors are of raw activations, as the dump stores them."""


def training_space(normalize: str | None) -> str:
    """The word the bar and printed lines use for training-space figures."""
    return "normalised" if normalize == "expected_norm" else "raw"


def raw_mse(mse: float, target_scale: float) -> float:
    """A training-space mean squared error in raw units (the target side's scale: the input's for an SAE)."""
    return mse / (target_scale * target_scale)


def training_mse_text(logged: dict[str, Any], normalize: str | None) -> str:
    """The training bar's mse: `mse 38.58 normalised (150.5 raw)`, or `mse 150.5 raw`."""
    mse, raw = logged.get("mse", math.nan), logged.get("mse_raw", math.nan)
    if training_space(normalize) == "raw":
        return f"mse {mse:.4g} raw"
    return f"mse {mse:.4g} normalised ({raw:.4g} raw)"


PRINTED_UNITS = {"mse": "raw", "kl_clean_sae": "nats"}
"""The unit word printed after a figure of `evaluate`; the others are fractions or counts."""


def metrics_line(result: dict[str, Any], keys: Iterable[str]) -> str:
    """`evaluate`'s printed figures: `mse 150.5 raw, explained_variance 0.91, ...` (eval.json's units)."""
    shown = []
    for k in keys:
        value = result.get(k)
        if value is None:
            continue
        shown.append(f"{k} {value:.4g}" + (f" {PRINTED_UNITS[k]}" if k in PRINTED_UNITS else ""))
    return ", ".join(shown)
