"""Every rule a manifest.json must satisfy, checked before any shard is opened.

A manifest is the only index of a dump, so a wrong type or count in it would otherwise surface
far from its cause: as bytes read in the wrong dtype, a row index past a shard's end, or a file
opened outside the dump. `validate` runs these checks in order (shape of the JSON, each field's
type and range, each shard entry, then the totals that must agree) and raises one `DumpError`
naming the manifest, the field, and what to do. What needs the shard files themselves (their
shapes and header dtypes) is checked by `shared.reader.open_dump`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from shared.errors import DumpError

# The format's constants live here (shared.manifest re-exports them) so this module needs nothing
# from the dataclasses it guards.
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("safetensors", "zarr")
COMPRESSIONS = (None, "zstd")
OPTIONAL_FIELDS = ("compression", "extra", "pass_id")
"""Fields a manifest may lack: written by later versions (`pass_id`) or only when they apply."""
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
_FIX = "re-harvest the dump"

# A check returns None when the value is fine, else what the value should have been.
Check = Callable[[Any], "str | None"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(where: str, field: str, problem: str) -> DumpError:
    return DumpError(f"{where}: {field} {problem}; {_FIX}")


# ---- value checks ----------------------------------------------------------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count


def is_number(value: Any) -> bool:
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))


def integer(minimum: int, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        if is_int(value) and value >= minimum:
            return None
        return f"an integer >= {minimum}" + (" or null" if optional else "")
    return check


_JSON_NAMES = {str: "string", bool: "boolean", dict: "object", list: "list"}


def of_type(kind: type, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if (value is None and optional) or isinstance(value, kind):
            return None
        return f"a JSON {_JSON_NAMES[kind]}" + (" or null" if optional else "")
    return check


def one_of(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        # Compared with their types: in Python 1 == 1.0 == True, in a manifest they differ.
        if any(type(value) is type(a) and value == a for a in allowed):
            return None
        return "one of " + ", ".join("null" if a is None else str(a) for a in allowed)
    return check


def finite_number(value: Any) -> str | None:
    return None if is_number(value) and value >= 0 else "a finite number >= 0"


def number_list(length: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, list) and len(value) == length and all(is_number(v) for v in value):
            return None
        return f"a list of {length} finite numbers (d_in)"
    return check


def sha256_checksum(value: Any) -> str | None:
    return None if isinstance(value, str) and _CHECKSUM.fullmatch(value) else "'sha256:' and 64 hex digits"


def plain_file_name(value: Any) -> str | None:
    """A shard is a file directly inside the dump: never a path that could lead out of it."""
    if not isinstance(value, str):
        return "a file name"
    # A plain name is its own last component on every system (no separator, drive or root).
    plain = PurePosixPath(value).name == value == PureWindowsPath(value).name
    if not plain or value in ("", ".", "..") or "\0" in value:
        return "a plain file name inside the dump (no folder, no '..', not absolute)"
    return None


FIELDS: dict[str, Check] = {
    "format_version": one_of(FORMAT_VERSION),
    "complete": of_type(bool),
    "format": one_of(*FORMATS),
    "compression": one_of(*COMPRESSIONS),
    "model": of_type(str),
    "model_fingerprint": of_type(str),
    "config_fingerprint": of_type(str),
    "hook": of_type(str),
    "layer": integer(-1, optional=True),
    "d_in": integer(1),
    "dtype": one_of(*STORAGE_DTYPES),
    "context_size": integer(1),
    "rows_per_context": integer(1),
    "dataset": of_type(str),
    "split": of_type(str),
    "column": of_type(str),
    "tokenized": of_type(bool),
    "tokenizer": of_type(str, optional=True),
    "bos_token_id": integer(0, optional=True),
    "prepend_bos": of_type(bool),
    "skip_bos": of_type(bool),
    "shard_rows": integer(1),
    "n_rows": integer(0),
    "n_contexts": integer(0),
    "n_tokens": integer(0),
    "shards": of_type(list),
    "stats": of_type(dict, optional=True),
    "harvest_config": of_type(dict),
    "versions": of_type(dict),
    "created": of_type(str),
    "extra": of_type(dict),
    "pass_id": of_type(str, optional=True),
}

SHARD_FIELDS: dict[str, Check] = {
    "file": plain_file_name,
    "rows": integer(1),
    "first_row": integer(0),
    "checksum": sha256_checksum,
    "sum": of_type(list),  # its length and numbers are checked in check_shards, with d_in
    "sum_sq_norm": finite_number,
    "sum_norm": finite_number,
}


def check_fields(raw: dict[str, Any], checks: dict[str, Check], where: str, prefix: str = "") -> None:
    """Every field present (optional ones aside) and of the right type and range."""
    missing = [n for n in checks if n not in raw and n not in OPTIONAL_FIELDS]
    if missing:
        raise fail(where, prefix.rstrip(".") or "manifest", f"lacks {', '.join(missing)}")
    for name, check in checks.items():
        if name in raw and (expected := check(raw[name])) is not None:
            raise fail(where, f"'{prefix}{name}'", f"must be {expected}, got {_short(raw[name])}")


# ---- rules across fields ---------------------------------------------------------------------
def check_shards(raw: dict[str, Any], where: str) -> None:
    """Each entry well formed, rows contiguous from 0, every shard full but the last, names unique."""
    shards, next_row, names = raw["shards"], 0, set()
    for i, entry in enumerate(shards):
        field = f"shards[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, f"'{field}'", f"must be an object, got {_short(entry)}")
        check_fields(entry, SHARD_FIELDS, where, prefix=f"{field}.")
        if (expected := number_list(raw["d_in"])(entry["sum"])) is not None:
            raise fail(where, f"'{field}.sum'", f"must be {expected}, got {_short(entry['sum'])}")
        if entry["file"] in names:
            raise fail(where, f"'{field}.file'", f"{entry['file']} is listed twice")
        names.add(entry["file"])
        if entry["first_row"] != next_row:
            raise fail(where, f"'{field}.first_row'", f"is {entry['first_row']}, but the shards "
                       f"before it end at row {next_row}")
        last = i == len(shards) - 1
        if entry["rows"] > raw["shard_rows"] or (not last and entry["rows"] != raw["shard_rows"]):
            raise fail(where, f"'{field}.rows'", f"is {entry['rows']}; every shard holds shard_rows "
                       f"({raw['shard_rows']}) rows, the last at most that")
        next_row += entry["rows"]


def check_settings(raw: dict[str, Any], where: str) -> None:
    """How contexts were built: settings harvest never combines differently."""
    if raw["rows_per_context"] != raw["context_size"] - (1 if raw["skip_bos"] else 0):
        raise fail(where, "'rows_per_context'", f"is {raw['rows_per_context']}, but context_size "
                   f"{raw['context_size']} with skip_bos {raw['skip_bos']} gives "
                   f"{raw['context_size'] - (1 if raw['skip_bos'] else 0)}")
    if raw["skip_bos"] and not raw["prepend_bos"]:
        raise fail(where, "'skip_bos'", "is true without prepend_bos (there is no BOS to skip)")
    if raw["prepend_bos"] and raw["bos_token_id"] is None:
        raise fail(where, "'bos_token_id'", "is null, but prepend_bos is true")
    if raw.get("compression") is not None and raw["format"] != "zarr":
        raise fail(where, "'compression'", f"is {raw['compression']} for a {raw['format']} dump (zarr only)")


def check_totals(raw: dict[str, Any], where: str) -> None:
    """The counts agree: contexts x rows per context = rows = rows listed in shards (once complete)."""
    if raw["n_tokens"] != raw["n_contexts"] * raw["context_size"]:
        raise fail(where, "'n_tokens'", f"is {raw['n_tokens']}, but n_contexts x context_size = "
                   f"{raw['n_contexts'] * raw['context_size']}")
    planned = raw["n_contexts"] * raw["rows_per_context"]
    listed = sum(entry["rows"] for entry in raw["shards"])
    if listed > planned:
        raise fail(where, "'shards'", f"list {listed} rows, more than n_contexts x rows_per_context "
                   f"= {planned}")
    if raw["complete"]:
        if raw["n_rows"] != planned:
            raise fail(where, "'n_rows'", f"is {raw['n_rows']}, but n_contexts x rows_per_context = "
                       f"{raw['n_contexts']} x {raw['rows_per_context']} = {planned}")
        if listed != raw["n_rows"]:
            raise fail(where, "'shards'", f"list {listed} rows, but n_rows is {raw['n_rows']}")


def check_stats(raw: dict[str, Any], where: str) -> None:
    """What `train` normalizes with: present in a complete dump with rows, and of d_in numbers."""
    stats = raw["stats"]
    if stats is None:
        if raw["complete"] and raw["n_rows"] > 0:
            raise fail(where, "'stats'", "is missing from a complete dump")
        return
    checks: dict[str, Check] = {"rows": integer(0), "mean": number_list(raw["d_in"]),
                                "mean_sq_norm": finite_number, "mean_norm": finite_number}
    check_fields(stats, checks, where, prefix="stats.")
    if raw["complete"] and stats["rows"] != raw["n_rows"]:
        raise fail(where, "'stats.rows'", f"is {stats['rows']}, but n_rows is {raw['n_rows']}")
    if stats["rows"] == sum(entry["rows"] for entry in raw["shards"]) > 0:
        check_stats_sums(stats, raw["shards"], where)


STATS_RTOL = 1e-9
"""How far a statistic may lie from its recomputation from the shard sums: harvest computes it
from them in float64 (Manifest.finalize_stats), so only summation order can move it, by far less."""


def check_stats_sums(stats: dict[str, Any], shards: list[dict[str, Any]], where: str) -> None:
    """`stats` is what the shards' own sums give: mean = sum of `sum`s / rows, mean_sq_norm and
    mean_norm likewise. `train` scales by mean_norm (expected_norm) and starts b_dec at the mean,
    so an edited statistic would change training without a checksum noticing. The norms first:
    the mean is held to a precision relative to them."""
    rows = stats["rows"]
    for name, total in (("mean_sq_norm", "sum_sq_norm"), ("mean_norm", "sum_norm")):
        want = math.fsum(entry[total] for entry in shards) / rows
        if not math.isclose(stats[name], want, rel_tol=STATS_RTOL, abs_tol=0.0):
            raise fail(where, f"'stats.{name}'", f"is {stats[name]!r}, but the shards' sums give {want!r}")
    import numpy as np  # here, not at the top: `--help` must not import numpy

    sums = np.asarray([entry["sum"] for entry in shards], dtype=np.float64)  # [shards, d_in]
    mean = sums.sum(axis=0) / rows
    # Each dimension against the typical size of one (the root mean square), so that a mean near
    # zero is held to the same absolute precision as the rest.
    scale = math.sqrt(stats["mean_sq_norm"] / max(1, len(mean))) if stats["mean_sq_norm"] > 0 else 0.0
    got = np.asarray(stats["mean"], dtype=np.float64)
    bad = np.flatnonzero(np.abs(got - mean) > STATS_RTOL * np.maximum(np.abs(mean), scale))
    if bad.size:
        i = int(bad[0])
        raise fail(where, f"'stats.mean[{i}]'", f"is {float(got[i])!r}, but the shards' sums give {float(mean[i])!r}")


def validate(raw: Any, where: str) -> None:
    """Raise a DumpError for the first rule `raw` (a parsed manifest.json) breaks."""
    if not isinstance(raw, dict):
        raise fail(where, "content", f"must be a JSON object, got a JSON {type(raw).__name__}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DumpError(f"{where}: format_version {_short(raw.get('format_version'))} is not "
                        f"{FORMAT_VERSION}; re-harvest it with this version of mats-sae-training")
    check_fields(raw, FIELDS, where)
    check_shards(raw, where)
    check_settings(raw, where)
    check_totals(raw, where)
    check_stats(raw, where)
