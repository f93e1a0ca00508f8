"""scripts/quickstart.sh run again skips what is done (the installs while .venv matches
pyproject.toml and the torch build, the harvest while its dump is complete), and says so.

The script runs for real in a copy of the repository whose .venv is a fake: its python, pip and
harvest only log their arguments (the real installs and harvest are what the packaged-model tests
and the quickstart itself exercise)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a bash process per run

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$QUICKSTART_TEST_LOG"
if [ "$(basename "$0")" = harvest ]; then
    mkdir -p data/smollm2135m_l0 && echo '{"complete": true}' > data/smollm2135m_l0/manifest.json
fi
if [ "$(basename "$0")" = pip ] && [ -n "${FAIL_PIP:-}" ]; then exit 1; fi
"""


@pytest.fixture
def repo(tmp_path) -> Path:
    """A copy of the script and pyproject.toml, with a fake .venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "quickstart.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    for tool in ("python", "pip", "harvest"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    return tmp_path


def quickstart(repo: Path, **env: str) -> tuple[str, list[str]]:
    """(the script's output, the tool calls it made), running its install and harvest steps."""
    log = repo / "calls.log"
    log.write_text("")
    got = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QUICKSTART_STEPS": "install,harvest", "QUICKSTART_TEST_LOG": str(log),
                              **env})
    assert got.returncode == 0 or env.get("FAIL_PIP"), got.stderr
    return got.stdout, log.read_text().splitlines()


def test_a_second_run_skips_the_installs_and_the_harvest(repo):
    out, calls = quickstart(repo)
    assert "skipping" not in out
    assert [c.split()[0] for c in calls] == ["python", "pip", "pip", "pip", "harvest"]
    assert any("-e .[demo,test]" in c for c in calls) and "--tokens 300000" in calls[-1]

    out, calls = quickstart(repo)
    assert out.splitlines() == ["quickstart: .venv is up to date, skipping installs",
                                "quickstart: data/smollm2135m_l0 already harvested, skipping the harvest"]
    assert calls == []


def test_what_changed_is_redone(repo):
    quickstart(repo)
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    out, calls = quickstart(repo, TOKENS="2000000")
    assert "skipping" not in out
    assert [c.split()[0] for c in calls] == ["python", "pip", "pip", "pip", "harvest"]
    assert "--tokens 2000000" in calls[-1]


def test_an_interrupted_install_or_harvest_is_redone(repo):
    quickstart(repo, FAIL_PIP="1")  # pip fails: the script stops before writing its stamp
    out, calls = quickstart(repo)
    assert "skipping installs" not in out and calls[0].startswith("python -m pip")
    (repo / "data" / "smollm2135m_l0" / "manifest.json").write_text('{"complete": false}')
    out, calls = quickstart(repo)
    assert out.splitlines() == ["quickstart: .venv is up to date, skipping installs"]
    assert [c.split()[0] for c in calls] == ["harvest"]
