"""The `dead_features` part: how training finds and revives features that stopped firing.

Settings that only some architectures use default to None in the config (so that one given for an
SAE that does not use it can be refused); `resolved` is the value None stands for, declared here
once. `policies` says which dead-feature policies (`SAE.dead_feature_policy`) use a setting.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from shared.settings import DENSITY, NON_NEGATIVE, POSITIVE, setting

SAMPLING_METHODS = ("anthropic", "l2", "none")


@dataclass
class DeadFeaturesPart:
    feature_sampling_method: str | None = setting(None, choices=SAMPLING_METHODS, resolved="anthropic",
                                                  policies=("resample",))
    """Dead-feature resampling: anthropic, l2 (the seed's) or none."""
    feature_sampling_window: int = setting(1000, POSITIVE)
    """Steps between resampling checks and density histograms."""
    dead_feature_window: int | None = setting(None, POSITIVE, resolved=500, policies=("resample", "auxk"))
    """Steps without firing after which a feature is dead (resampled by anthropic; reconstructs the
    residual in AuxK)."""
    dead_feature_threshold: float | None = setting(None, DENSITY, resolved=1e-8, policies=("resample",))
    """l2: density below this over the sampling window is dead."""
    feature_reinit_scale: float | None = setting(None, NON_NEGATIVE, resolved=0.2,
                                                 policies=("resample",))
    """Resampled encoder norm = this x mean alive encoder norm."""
    resample_sample_rows: int | None = setting(None, POSITIVE, resolved=819_200, policies=("resample",))
    """anthropic: rows on which the loss is measured to pick the inputs resampled features copy."""


def resolved_defaults() -> dict[str, Any]:
    """{setting: the value None stands for} of the settings left to the policy."""
    return {f.name: f.metadata["resolved"] for f in fields(DeadFeaturesPart) if "resolved" in f.metadata}


def policy_settings(policy: str) -> set[str]:
    """The settings of this part an SAE with dead-feature policy `policy` uses."""
    return {f.name for f in fields(DeadFeaturesPart) if policy in f.metadata.get("policies", (policy,))}
