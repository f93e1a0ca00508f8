"""Values as config files and flags give them, checked against their declared type.

PyYAML reads `lr: 1e-4` as the string "1e-4" (YAML 1.1 floats need a dot), so numbers given as
strings are converted; anything else of the wrong type is a one-line error.
"""
from __future__ import annotations

import re
from typing import Any

from shared.errors import UserError


def coerce(name: str, annotation: str, value: Any) -> Any:
    """`value` converted to the field's type ('int | None', 'list[int]'...), or a one-line UserError."""
    if value is None:
        if "None" in annotation:
            return None
        raise UserError(f"{name} cannot be empty")
    kind = annotation.split("|")[0].strip()
    if kind == "list[int]":
        return int_list(name, value)
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


def int_list(name: str, value: Any) -> list[int]:
    """'256,1024,4096' (a flag) or [256, 1024, 4096] (a config file) -> [256, 1024, 4096]."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise UserError(f"{name} must be a list of whole numbers such as 256,1024,4096, got {value!r}")
    out = []
    for item in items:
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UserError(f"{name} must be a list of whole numbers such as 256,1024,4096, got {value!r}") from None
        if isinstance(item, bool) or not number.is_integer():
            raise UserError(f"{name} must be a list of whole numbers such as 256,1024,4096, got {value!r}")
        out.append(int(number))
    return out


def dtype_name(dtype: Any) -> str:
    """Accept torch dtypes as the seed's config did (dtype=torch.float32)."""
    return re.sub(r"^torch\.", "", str(dtype))
