"""The config's flat view: every setting of every part under its own name, with its part.

`flat_fields()` is what `dataclasses.fields(LanguageModelSAERunnerConfig)` gives: one
`dataclasses.Field` per setting, in part order (the architecture settings after the `sae` part's
own), each with `metadata` {"group": its part, "help": the first sentence of its docstring,
"range", "choices", ...}. Built from the parts and the registry when asked (cached per registry).
"""
from __future__ import annotations

from dataclasses import Field, field, fields, make_dataclass
from functools import lru_cache
from typing import Any

from shared.saes.registry import settings_classes
from shared.settings import field_docs, first_sentence
from train.config.architectures import architecture_settings
from train.config.data import DataPart
from train.config.dead_features import DeadFeaturesPart
from train.config.evaluation import EvaluationPart
from train.config.logging import LoggingPart
from train.config.optimizer import OptimizerPart
from train.config.run import RunPart
from train.config.sae import SAEPart

PARTS: dict[str, type] = {"data": DataPart, "sae": SAEPart, "optimizer": OptimizerPart,
                          "dead_features": DeadFeaturesPart, "evaluation": EvaluationPart, "run": RunPart,
                          "logging": LoggingPart}
GROUPS = tuple(PARTS)
"""Who owns each setting. `data` settings define the one stream of batches a sweep shares; `run`,
`evaluation` and `logging` settings describe the run as a whole. Only `sae`, `optimizer` and
`dead_features` settings may differ between the SAEs of a sweep."""
SWEEPABLE_GROUPS = ("sae", "optimizer", "dead_features")
ARCHITECTURE = "architecture_settings"  # the `sae` part's field holding the architectures' settings


def flat_fields() -> dict[str, Field]:
    """{name: Field} of every setting (see the module docstring)."""
    return _flat(tuple(settings_classes().items()))


@lru_cache(maxsize=8)
def _flat(registry: tuple) -> dict[str, Field]:
    specs: list[tuple[str, str, Field]] = []
    for group, part in PARTS.items():
        docs = field_docs(part)
        for f in fields(part):
            if f.name == ARCHITECTURE:
                specs += [_architecture_field(s) for s in architecture_settings().values()]
                continue
            meta = {**f.metadata, "group": group, "help": first_sentence(docs.get(f.name, "")), "doc": docs.get(f.name, "")}
            if f.name == "architecture":  # its choices are the registry's
                meta["help"] = f"SAE architecture: {', '.join(name for name, _ in registry)}."
            specs.append((f.name, str(f.type), field(default=f.default, metadata=meta)))
    flat = make_dataclass("FlatConfig", specs)
    return dict(flat.__dataclass_fields__)


def _architecture_field(s: Any) -> tuple[str, str, Field]:
    meta = {"group": "sae", "help": s.help(), "doc": s.doc, "range": s.range, "architecture": True,
            "default_text": s.default_text()}
    return s.name, s.config_annotation, field(default=None, metadata=meta)


def owner(name: str) -> str | None:
    """The part holding flat setting `name` ('sae' for architecture settings), None if no setting."""
    f = flat_fields().get(name)
    return None if f is None else f.metadata["group"]


def is_architecture_setting(name: str) -> bool:
    f = flat_fields().get(name)
    return f is not None and bool(f.metadata.get("architecture"))
