"""Declared settings: a dataclass field states its type, default, range and (as the docstring under
it) its meaning once; checks, flags, help text and docs are derived from that declaration.

    @dataclass
    class TopKSettings(BaseSettings):
        k: int = setting(32, POSITIVE)
        \"\"\"Latents kept per row.\"\"\"

`check_fields(obj)` checks every declared field of a dataclass instance (its type, and its range);
`field_docs(cls)` reads the docstrings under the fields (from the source, as Sphinx does).
"""
from __future__ import annotations

import ast
import inspect
import math
import textwrap
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import lru_cache
from typing import Any

from shared.errors import UserError


@dataclass(frozen=True)
class Range:
    """Where a number may lie: above 0 (or at 0 when `zero_ok`), at most `high` when given; always
    finite (an inf lr or a NaN coefficient would train to NaN weights for the whole run)."""

    zero_ok: bool
    high: float | None = None
    at_least: float | None = None
    """A smallest allowed value above 0 (d_sae: 2)."""

    def check(self, name: str, value: Any, kind: str) -> None:
        """A one-line UserError unless `value` (already of type `kind`, "int" or "float") is in range."""
        low_ok = value >= 0 if self.zero_ok else value > 0
        ok = math.isfinite(value) and low_ok and (self.high is None or value <= self.high) \
            and (self.at_least is None or value >= self.at_least)
        if not ok:
            raise UserError(f"{name} must {self.text(kind)}, got {value}")

    def text(self, kind: str) -> str:
        if self.at_least is not None:
            return f"be at least {self.at_least:g}"
        if self.high is not None:
            return f"be in {'[' if self.zero_ok else '('}0, {self.high:g}]"
        if kind == "int":
            return "not be negative" if self.zero_ok else "be positive"
        return "be a finite number >= 0" if self.zero_ok else "be a positive finite number"


POSITIVE = Range(zero_ok=False)
NON_NEGATIVE = Range(zero_ok=True)
RATE = Range(zero_ok=False, high=1.0)
"""(0, 1]: a running-average rate."""
DENSITY = Range(zero_ok=True, high=1.0)
"""[0, 1]: a fraction of rows."""


def setting(default: Any, range: Range | None = None, **metadata: Any) -> Any:
    """A dataclass field with its range (checked by `check_fields`) and any other metadata."""
    return field(default=default, metadata={"range": range, **metadata})


def kind_of(annotation: Any) -> str:
    """'int | None' -> 'int'; 'list[int] | None' -> 'list[int]' (the part that is not None)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    return next((p for p in parts if p != "None"), "None")


def allows_none(annotation: Any) -> bool:
    return "None" in [p.strip() for p in str(annotation).split("|")]


def check_value(name: str, annotation: Any, value: Any, range: Range | None) -> None:
    """`value` of the declared type (None where allowed) and in its range; a one-line UserError."""
    if value is None:
        if allows_none(annotation):
            return
        raise UserError(f"{name} cannot be empty")
    kind = kind_of(annotation)
    if kind == "bool" and not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{name} must be a number, got {value!r}")
    if range is not None and kind in ("int", "float"):
        range.check(name, value, kind)


def check_fields(obj: Any) -> None:
    """Every field of the dataclass instance `obj` of its declared type and in its declared range."""
    for f in fields(obj):
        check_value(f.name, f.type, getattr(obj, f.name), f.metadata.get("range"))


def declared_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} for a dataclass and its bases (the class's own win)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__dataclass_fields__" not in vars(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (built in an interpreter): no docs
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def first_sentence(doc: str) -> str:
    """The docstring's first sentence, on one line (for --help and tables)."""
    text = " ".join(doc.split())
    for i, char in enumerate(text):
        if char == "." and (i + 1 == len(text) or (text[i + 1] == " " and text[i + 2: i + 3].isupper())):
            return text[: i + 1]
    return text
