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


def set_pass_id(folders, pass_id: str = "test-pass", keep: bool = True) -> None:
    """Give the manifests in `folders` (local dump folders, or s3:// dumps) the same `pass_id`, as
    a harvest pass writing them all does; `keep` leaves a pass_id a manifest already has (so the
    tests hold whether or not harvest writes one)."""
    from shared import storage
    from shared.manifest import MANIFEST_NAME

    for folder in folders:
        if storage.is_remote(folder):
            path = storage.location(folder) / MANIFEST_NAME
            raw = json.loads(storage.get_bytes(path))
        else:
            path = Path(folder) / MANIFEST_NAME
            raw = json.loads(path.read_text())
        if raw.get("pass_id") is None or not keep:
            raw["pass_id"] = pass_id
        data = json.dumps(raw, indent=1).encode()
        if storage.is_remote(folder):
            storage.put_bytes(path, data)
        else:
            path.write_bytes(data)
