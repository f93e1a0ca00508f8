"""Shared test helpers: run the harvest CLI in-process and compare dumps."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from harvest.cli import main as harvest_main


def run_harvest(*args: str, expect_ok: bool = True):
    result = CliRunner().invoke(harvest_main, ["--quiet", *args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def dump_files(folder: Path) -> dict[str, bytes]:
    """Every file of a dump by name, for byte-for-byte comparison.

    The manifest's creation time and pass identifier are blanked: they are the fields two separate
    runs cannot share (a resume keeps the pass's; tests compare it with `pass_id`).
    """
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    assert manifest.get("pass_id"), f"{folder}: the manifest names no pass"
    manifest["created"] = None
    manifest["pass_id"] = None
    files["manifest.json"] = json.dumps(manifest).encode()
    return files


def pass_id(folder: Path) -> str | None:
    """The pass identifier in the dump's manifest (None when the manifest lacks one)."""
    return json.loads((folder / "manifest.json").read_text()).get("pass_id")
