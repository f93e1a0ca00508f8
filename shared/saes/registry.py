"""Architecture name (cfg.json's `architecture`) -> class. Adding an architecture is its file in this
package (the `SAE` subclass), its torch-free `<name>_settings.py` (the `Settings` dataclass the
class uses), and one line in `_BUILT_IN`.

The registry names classes by where they live and imports one only when it is asked for, so that
listing the architectures and their settings (`train --help`, the config) never imports torch:
`settings_classes()` reads the settings modules alone. `ARCHITECTURES` is a mutable mapping of
name -> class like the dict it replaces: a plug-in or a test registers a class object with
`ARCHITECTURES[name] = cls`.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.errors import UserError

if TYPE_CHECKING:
    from shared.saes.base import SAE
    from shared.saes.settings_base import BaseSettings


@dataclass(frozen=True)
class Lazy:
    """A registered architecture not imported yet: 'module:Name' of its class and of its settings."""

    cls: str
    settings: str


def _load(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


_BUILT_IN = {
    "standard": Lazy("shared.saes.standard:StandardSAE", "shared.saes.standard_settings:StandardSettings"),
    "jumprelu": Lazy("shared.saes.jumprelu:JumpReLUSAE", "shared.saes.jumprelu_settings:JumpReLUSettings"),
    "gated": Lazy("shared.saes.gated:GatedSAE", "shared.saes.gated_settings:GatedSettings"),
    "topk": Lazy("shared.saes.topk:TopKSAE", "shared.saes.topk_settings:TopKSettings"),
    "batchtopk": Lazy("shared.saes.batchtopk:BatchTopKSAE", "shared.saes.batchtopk_settings:BatchTopKSettings"),
    "matryoshka_batchtopk": Lazy("shared.saes.matryoshka:MatryoshkaBatchTopKSAE",
                                 "shared.saes.matryoshka_settings:MatryoshkaBatchTopKSettings"),
    "crosscoder": Lazy("shared.saes.crosscoder:CrosscoderSAE", "shared.saes.crosscoder_settings:CrosscoderSettings"),
    "jumprelu_clt": Lazy("shared.saes.clt:JumpReLUCLT", "shared.saes.clt_settings:JumpReLUCLTSettings"),
    "topk_clt": Lazy("shared.saes.clt:TopKCLT", "shared.saes.clt_settings:TopKCLTSettings"),
}


class Registry(MutableMapping):
    """name -> SAE class, in registration order; a `Lazy` entry is imported on first access."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self._entries: dict[str, Any] = dict(entries)

    def __getitem__(self, name: str) -> type[SAE]:
        entry = self._entries[name]
        if isinstance(entry, Lazy):
            cls = _load(entry.cls)
            if cls.Settings is not _load(entry.settings):  # the two halves of the line must agree
                raise TypeError(f"architecture {name}: {entry.cls} uses {cls.Settings.__name__}, "
                                f"not {entry.settings}")
            self._entries[name] = entry = cls
        return entry

    def __setitem__(self, name: str, cls: Any) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def settings_class(self, name: str) -> type[BaseSettings]:
        """The architecture's `Settings` dataclass, without importing its class (nor torch)."""
        entry = self._entries[name]
        return _load(entry.settings) if isinstance(entry, Lazy) else entry.Settings

    def __repr__(self) -> str:
        return f"Registry({list(self._entries)})"


ARCHITECTURES = Registry(_BUILT_IN)


def settings_classes() -> dict[str, type[BaseSettings]]:
    """{architecture: its Settings dataclass}, in registry order, torch-free."""
    return {name: ARCHITECTURES.settings_class(name) for name in ARCHITECTURES}


def architecture_class(name: str) -> type[SAE]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UserError(f"unknown SAE architecture '{name}'; known: {', '.join(ARCHITECTURES)}") from None
