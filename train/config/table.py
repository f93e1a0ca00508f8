"""The `train` key table of the docs, generated from the declarations (`scripts/settings_table.py`
prints it; a test checks the docs hold exactly this)."""
from __future__ import annotations

from dataclasses import Field

from train.config.architectures import show
from train.config.flat import flat_fields

HEADER = ("| key | default | meaning |", "|---|---|---|")


def train_keys() -> list[Field]:
    """The settings `train` takes (flags and config keys): not the harvest settings the Python API
    harvests a missing dump with, nor the seed's ignored names."""
    return [f for f in flat_fields().values() if "harvest_flag" not in f.metadata and not f.metadata.get("ignored")]


def default_text(f: Field) -> str:
    """What the default is: stated (`default_text`), the value None stands for, or the value; '–' if none."""
    text = f.metadata.get("default_text") or (show(f.metadata["resolved"]) if "resolved" in f.metadata else "")
    if not text and f.default is not None:
        text = f"`{f.default}`" if isinstance(f.default, str) else show(f.default)
    return text or "–"


def settings_table() -> str:
    """The markdown table: one row per `train` key, in part order, architecture settings in the sae part."""
    rows = [f"| `{f.name}` | {default_text(f)} | ({f.metadata['group']}) {_cell(f.metadata['help'])} |"
            for f in train_keys()]
    return "\n".join([*HEADER, *rows]) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar would end the cell (E||x||)


def table_span(lines: list[str]) -> tuple[int, int] | None:
    """[start, end) of the settings table among a doc's lines (from its header row), None if absent."""
    if HEADER[0] not in lines:
        return None
    start = lines.index(HEADER[0])
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return start, end


def with_table(doc: str) -> str:
    """The doc's text with its settings table replaced by the generated one."""
    lines = doc.splitlines()
    span = table_span(lines)
    if span is None:
        raise ValueError(f"no settings table (a row {HEADER[0]!r}) to replace")
    new = lines[: span[0]] + settings_table().splitlines() + lines[span[1]:]
    return "\n".join(new) + ("\n" if doc.endswith("\n") else "")
