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

    The manifest's creation time is blanked: it is the one field two separate runs cannot share.
    """
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    manifest["created"] = None
    files["manifest.json"] = json.dumps(manifest).encode()
    return files
