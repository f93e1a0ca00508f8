"""`LanguageModelSAERunnerConfig`: the training config in typed parts, under the seed's flat names.

The settings live in seven parts (`cfg.data`, `cfg.sae`, `cfg.optimizer`, `cfg.dead_features`,
`cfg.evaluation`, `cfg.run`, `cfg.logging`; see `train.config.flat.PARTS`). The class is also the
seed's flat config: it is built from flat keywords (the Python API, config files, flags), every
setting reads and writes as `cfg.<name>`, `dataclasses.fields`, `asdict` and `replace` see the flat
settings, and `to_dict()` / `from_dict()` give and take the flat dict that run folders record
(config.json, sweep.json, trainer state), so folders written before still load and resume.
"""
from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

from shared.errors import UserError
from shared.saes.registry import ARCHITECTURES, architecture_class
from shared.settings import check_value
from train.config.coerce import coerce, dtype_name
from train.config.flat import PARTS, flat_fields, is_architecture_setting, owner


class _FlatFields:
    """`__dataclass_fields__` of the config: the flat settings (see `train.config.flat`)."""

    def __get__(self, obj: Any, owner_class: Any) -> dict:
        return flat_fields()


class LanguageModelSAERunnerConfig:
    """Everything that defines one SAE training run (the seed's names where the seed had them,
    SAELens' names for the newer architectures' settings).

    Settings of one architecture default to None, meaning "the architecture's default", so that a
    setting no SAE of a run uses can be told apart from one left alone (`train.arch_settings`
    refuses the former).
    """

    __dataclass_fields__ = _FlatFields()
    data: Any
    sae: Any
    optimizer: Any
    dead_features: Any
    evaluation: Any
    run: Any
    logging: Any

    def __init__(self, **flat: Any) -> None:
        known = flat_fields()
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise TypeError(f"LanguageModelSAERunnerConfig got unknown setting(s) {', '.join(unknown)}")
        values = {name: flat.get(name, f.default) for name, f in known.items()}
        values["dtype"] = dtype_name(values["dtype"])  # the seed passed dtype=torch.float32
        for name, f in known.items():
            values[name] = coerce(name, str(f.type), values[name])
        _check_choices(values)
        for name, f in known.items():
            check_value(name, f.type, values[name], f.metadata.get("range"))
        for group, part in PARTS.items():
            own = {f.name: values[f.name] for f in fields(part) if f.name in values}
            object.__setattr__(self, group, part(**own))
        self.sae.architecture_settings = {name: values[name] for name in known
                                          if is_architecture_setting(name) and values[name] is not None}

    # ---- the flat view ---------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        group = owner(name)
        part = self.__dict__.get(group) if group else None
        if part is None:
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        if is_architecture_setting(name):
            return part.architecture_settings.get(name)
        return getattr(part, name)

    def __setattr__(self, name: str, value: Any) -> None:
        group = owner(name)
        if group is None:
            object.__setattr__(self, name, value)
        elif is_architecture_setting(name):
            settings = self.__dict__[group].architecture_settings
            settings.pop(name, None) if value is None else settings.__setitem__(name, value)
        else:
            setattr(self.__dict__[group], name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LanguageModelSAERunnerConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.to_dict().items() if v != flat_fields()[k].default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def to_dict(self) -> dict[str, Any]:
        """The flat dict: every setting by name (what config.json, sweep.json and checkpoints hold)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in flat_fields()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "LanguageModelSAERunnerConfig":
        unknown = sorted(set(raw) - set(flat_fields()))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; see `train --help`")
        return cls(**raw)

    def section(self, group: str) -> dict[str, Any]:
        """The flat settings one part holds, e.g. cfg.section("sae") (with the architecture settings)."""
        if group not in PARTS:
            raise ValueError(f"unknown group {group!r}; groups: {tuple(PARTS)}")
        return {name: getattr(self, name) for name, f in flat_fields().items() if f.metadata["group"] == group}

    # ---- derived values --------------------------------------------------------------------
    def sae_width(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def default_run_name(self, d_in: int, dump_name: str) -> str:
        """The seed's '<d_sae>-L1-<l1>-LR-<lr>-<dump>' for standard SAEs; other architectures
        say theirs and their sparsity setting ('topk-2048-k-32-LR-...')."""
        cls = architecture_class(self.architecture)
        settings = cls.settings_from(self.to_dict())
        given = [f"{cls.sparsity_label}-{getattr(settings, cls.sparsity_setting):g}"] if cls.sparsity_setting else []
        head = [] if self.architecture == "standard" else [self.architecture]
        return "-".join(head + [str(self.sae_width(d_in))] + given + [f"LR-{self.lr:g}", dump_name])


def _check_choices(values: dict[str, Any]) -> None:
    choices = {name: f.metadata["choices"] for name, f in flat_fields().items() if f.metadata.get("choices")}
    choices["architecture"] = tuple(ARCHITECTURES)
    for name, allowed in choices.items():
        if values[name] is not None and values[name] not in allowed:
            raise UserError(f"{name} must be one of {', '.join(allowed)}, got '{values[name]}'")

