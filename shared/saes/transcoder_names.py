"""How a transcoder's architecture is named on disk (cfg.json's `architecture`), both ways.

SAELens 6.54 loads four transcoder classes: `transcoder` (ReLU), `skip_transcoder`,
`jumprelu_transcoder` and `jumprelu_skip_transcoder`. Ours save under those names where SAELens has
the class (standard -> transcoder; JumpReLU, and BatchTopK and Matryoshka, which save as JumpReLU,
-> jumprelu_transcoder; a skip path adds `skip_`), and under `<architecture>[_skip]_transcoder`
where it has none (topk_transcoder, gated_transcoder: our loader reads them, SAELens does not).
"""
from __future__ import annotations

from typing import NamedTuple

SUFFIX = "_transcoder"


class SavedName(NamedTuple):
    architecture: str
    """The SAE architecture whose encoder and decoder the folder holds (standard, jumprelu, ...)."""
    transcoder: bool
    skip: bool


def saved_name(architecture: str, transcoder: bool, skip: bool) -> str:
    """cfg.json's `architecture` for an SAE saved as `architecture` (its inference form)."""
    if not transcoder:
        return architecture
    stem = "" if architecture == "standard" else f"{architecture}_"
    return f"{stem}{'skip_' if skip else ''}transcoder"


def parse_saved_name(name: str) -> SavedName:
    """The inverse of `saved_name`: 'jumprelu_skip_transcoder' -> (jumprelu, True, True)."""
    if name != "transcoder" and not name.endswith(SUFFIX):
        return SavedName(name, False, False)
    stem = "" if name == "transcoder" else name[: -len(SUFFIX)]
    skip = stem == "skip" or stem.endswith("_skip")
    if skip:
        stem = stem[: -len("skip")].rstrip("_")
    return SavedName(stem or "standard", True, skip)
