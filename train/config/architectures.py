"""The architectures' own settings as config keys, read from their `Settings` dataclasses.

Each architecture declares its settings once (type, default, range, docstring) in the `Settings`
dataclass of its file in `shared.saes`; this module only lists them, for the config, the flags, the
sweep keys, `--help` and the docs. It reads the registry when asked, so an architecture registered
later (a plug-in, a test's toy) is seen like the built-in ones.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from shared.saes.registry import ARCHITECTURES, settings_classes
from shared.settings import Range, allows_none, declared_default, field_docs, first_sentence


@dataclass(frozen=True)
class ArchitectureSetting:
    """One setting of one or more architectures, as its first declaration (registry order) states it."""

    name: str
    annotation: str
    """The declared type, e.g. 'int' (the config's key takes None too: the architecture's default)."""
    range: Range | None
    doc: str
    """The docstring under its declaration."""
    defaults: tuple[tuple[str, Any], ...]
    """(architecture, default) for each architecture that has it, in registry order."""

    @property
    def users(self) -> list[str]:
        return [arch for arch, _ in self.defaults]

    @property
    def config_annotation(self) -> str:
        return self.annotation if allows_none(self.annotation) else f"{self.annotation} | None"

    def help(self) -> str:
        """'topk, batchtopk: Latents kept per row.' (no architectures named when all have it)."""
        who = "" if len(self.defaults) == len(ARCHITECTURES) else ", ".join(self.users) + ": "
        return who + first_sentence(self.doc)

    def default_text(self) -> str:
        """'32', or 'standard 1.2, gated 3' where architectures differ; '' when the default is None."""
        given = [(arch, value) for arch, value in self.defaults if value is not None]
        shown = {show(value) for _, value in given}
        if len(shown) == 1 and len(given) == len(self.defaults):
            return shown.pop()
        return ", ".join(f"{arch} {show(value)}" for arch, value in given)


def show(value: Any) -> str:
    """A default as --help and the docs write it: 0.03125 -> '0.03125', False -> 'off'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def architecture_settings() -> dict[str, ArchitectureSetting]:
    """Every architecture setting by name, in registry order (the first architecture declaring it first)."""
    return dict(_settings(tuple(settings_classes().items())))


@lru_cache(maxsize=8)
def _settings(registry: tuple[tuple[str, type], ...]) -> tuple[tuple[str, ArchitectureSetting], ...]:
    """From (architecture, its Settings dataclass) pairs: the registry, read without importing torch."""
    first: dict[str, tuple[Any, str]] = {}
    defaults: dict[str, list[tuple[str, Any]]] = {}
    for arch, settings in registry:
        docs = field_docs(settings)
        for f in fields(settings):
            first.setdefault(f.name, (f, docs.get(f.name, "")))
            defaults.setdefault(f.name, []).append((arch, declared_default(f)))
    return tuple((name, ArchitectureSetting(name, str(f.type), f.metadata.get("range"), doc, tuple(defaults[name])))
                 for name, (f, doc) in first.items())
