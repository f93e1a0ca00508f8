"""Storage as one interface: `Location` behaves the same on local disk and in a bucket (the moto
server of test_object_storage), and no module outside shared/storage/ asks which kind it holds."""
from __future__ import annotations

import ast
import errno
from pathlib import Path

import numpy as np
import pytest

from shared import atomic, storage
from shared.errors import UserError
from shared.storage import SCHEMES, LocalPath, Location, ObjectStorePath, absolute, location
from test_object_storage import _client, moto_url  # noqa: F401  (moto_url: a fixture, the moto server)

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harvest", "train", "shared", "benchmarks", "scripts")
STORAGE_PACKAGE = REPO / "shared" / "storage"
FORBIDDEN_NAMES = {"is_remote", "RemotePath"}


# ---- the boundary ----------------------------------------------------------------------------
def kind_tests(source: str) -> list[str]:
    """Where `source` asks which kind of storage it holds: a use of `is_remote` / `RemotePath`
    (as a name, an attribute or an import), or the bare scheme "s3://" as a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in FORBIDDEN_NAMES]
        elif isinstance(node, ast.Constant) and node.value == "s3://":
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_the_check_sees_every_way_of_asking():
    snippets = ['from shared.storage import is_remote', 'import shared.storage as s\ns.is_remote(x)',
                'isinstance(p, RemotePath)', 'url.startswith("s3://")']
    for snippet in snippets:
        assert kind_tests(snippet), snippet
    assert not kind_tests('help = "Output folder, or s3://bucket/prefix"\nwhere.capabilities.fetched')


def test_no_module_outside_the_storage_package_asks_which_kind_it_holds():
    offenders = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            if STORAGE_PACKAGE in path.parents:
                continue
            found = kind_tests(path.read_text())
            if found:
                offenders[name] = found
    assert not offenders, f"ask the location's capabilities or call its methods instead: {offenders}"


# ---- one interface, two implementations ------------------------------------------------------
@pytest.fixture
def bucket(moto_url, monkeypatch, request) -> str:  # noqa: F811
    """AWS settings pointing at the moto server, and a fresh bucket named after the test."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", moto_url)):
        monkeypatch.setenv(key, value)
    storage.set_endpoint(None)
    storage.reset_stores()
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    _client(moto_url).create_bucket(Bucket=name)
    yield name
    storage.reset_stores()


@pytest.fixture(params=["local", "bucket"])
def where(request, tmp_path) -> Location:
    """An empty location of each kind."""
    if request.param == "local":
        return location(str(tmp_path / "store"))
    return location(f"s3://{request.getfixturevalue('bucket')}/store")


def test_locations_come_from_the_scheme_registry(tmp_path):
    assert isinstance(location("s3://some-bucket/a/b"), ObjectStorePath) and SCHEMES["s3"] is ObjectStorePath
    local = location(tmp_path / "d")
    assert isinstance(local, LocalPath) and isinstance(local, Path) and local == tmp_path / "d"
    assert location(local) is local
    assert isinstance(location("relative/dir"), LocalPath)
    assert absolute("relative/dir") == str(Path("relative/dir").resolve())
    assert absolute("s3://some-bucket/a/") == "s3://some-bucket/a"
    with pytest.raises(UserError, match="not a valid bucket name"):
        location("s3://No_Such/x")
    with pytest.raises(UserError, match="no meaning"):
        location("s3://some-bucket/a/../b")


def test_join_name_parent(where):
    child = where / "a" / "b.json"
    assert child.name == "b.json" and child.parent == where / "a" and child.parent.parent == where
    assert str(child) == f"{where}/a/b.json" and type(child) is type(where)
    assert where / "a/b.json" == child


def test_write_read_list_delete(where):
    assert where.get_bytes() is None and not where.exists() and where.list_names() == []
    for name, data in (("a/b", b"1"), ("a/c/d", b"22"), ("e", b"333")):
        (where / name).parent.ensure_folder()
        (where / name).put_bytes(data)
    assert (where / "a/c/d").get_bytes() == b"22" and (where / "missing").get_bytes() is None
    assert where.list_names() == ["a/b", "a/c/d", "e"]
    assert where.list_names(limit=1) == ["a/b"] and (where / "a").list_names() == ["b", "c/d"]
    assert (where / "e").exists() and (where / "a").exists() and not (where / "x").exists()
    (where / "e").put_bytes(b"replaced")
    assert (where / "e").get_bytes() == b"replaced"
    (where / "a").delete()  # a folder / prefix and everything below it
    assert where.list_names() == ["e"]
    (where / "a").delete()  # nothing there is fine
    where.delete_names(["e"])
    assert where.list_names() == []


def _fail_the_write(where: Location, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next write fail in the middle: on disk after the temp file is written (a full
    disk at fsync + rename), in a bucket in the PUT."""
    if where.capabilities.folders:
        def commit(tmp, final):
            raise OSError(errno.ENOSPC, "No space left on device", str(final))
        monkeypatch.setattr(atomic, "commit", commit)
    else:
        import obstore

        def put(*_a, **_kw):
            raise obstore.exceptions.GenericError("connection reset in the middle of the body")
        monkeypatch.setattr(obstore, "put", put)


def test_atomic_write_leaves_no_partial_file_or_object(where):
    (where / "kept").parent.ensure_folder()
    (where / "kept").put_bytes(b"old contents")
    with pytest.MonkeyPatch.context() as patch:
        _fail_the_write(where, patch)
        with pytest.raises((OSError, UserError)):
            (where / "kept").put_bytes(b"new contents, never seen half-written")
        with pytest.raises((OSError, UserError)):
            (where / "new").put_bytes(b"never seen at all")
    assert (where / "kept").get_bytes() == b"old contents"
    assert (where / "new").get_bytes() is None and not (where / "new").exists()
    visible = [n for n in where.list_names() if not n.split("/")[-1].startswith(".")]  # temp names are hidden
    assert visible == ["kept"]


def test_staged_write_replaces_leftovers_and_lands_whole(where):
    final = where / "shard.zarr"
    final.ensure_folder()
    (final / "leftover").put_bytes(b"from a crashed write")
    with final.staged() as target:
        target.ensure_folder()
        (target / "part").put_bytes(b"new")
        if final.capabilities.folders:  # written under a temp name, renamed at the end
            assert target != final and not (final / "part").exists()
    assert final.list_names() == ["part"] and (final / "part").get_bytes() == b"new"


def test_zarr_store_round_trip(where):
    import zarr

    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    with where.errors():
        group = zarr.open_group(where.zarr_store(read_only=False), mode="w", zarr_format=3)
        group.create_array("x", shape=data.shape, dtype=data.dtype, chunks=(2, 4))[...] = data
        back = zarr.open_group(where.zarr_store(read_only=True), mode="r")["x"][...]
    assert np.array_equal(back, data)
    assert "zarr.json" in where.list_names() and "x/c/2/0" in where.list_names()


def test_capabilities_and_failures(where):
    caps = where.capabilities
    assert "zarr" in caps.formats and caps.folders != caps.fetched
    space = where.free_space()
    assert (space is not None and space.bytes > 0) == caps.folders
    with pytest.raises(ValueError):  # not a storage failure: passes unchanged
        with where.errors():
            raise ValueError("a bug")
    import obstore

    told = where.failure(obstore.exceptions.GenericError("<Code>NoSuchBucket</Code>"))
    assert (told is not None) == caps.fetched  # only the client's own errors are the storage's
    if told is not None:
        assert str(where) in str(told) and "does not exist" in str(told)
    assert where.failure(ValueError("a bug")) is None


