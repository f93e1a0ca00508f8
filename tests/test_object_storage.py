"""Dumps in object storage (s3://bucket/prefix), against a local moto server: harvest writes the
same dump as on disk, resumes in the bucket, train reads it to the same weights, damage and
storage failures are one-line errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import harvest.writer
from helpers import assert_aligned, harvest_pass, run_harvest
from shared import storage
from shared.errors import DumpError
from shared.reader import open_dump
from train.cli import main as train_main

# Slow tier: a moto server process per module, and one test under torchrun.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(**env: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while proc.poll() is None:  # no deadline: a loaded machine starts it late, not never
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server exited with code {proc.returncode} before listening")


@pytest.fixture(scope="module")
def moto_url():
    proc, url = _start_moto()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture
def s3(moto_url, monkeypatch, request):
    """AWS settings pointing at the moto server, and a fresh bucket named after the test."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_url)
    storage.set_endpoint(None)
    storage.reset_stores()
    bucket = request.node.name.lower().replace("_", "-")[:50].strip("-")
    client = _client(moto_url)
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    storage.reset_stores()


def _args(model: Path, ds: Path, out: str, tokens: int = 1000, shard_rows: int = 300) -> list[str]:
    return ["--model", str(model), "--dataset", str(ds), "--out", out, "--context-size", "32",
            "--batch-size", "5", "--tokens", str(tokens), "--shard-rows", str(shard_rows)]


def _same_dump(a, b) -> None:
    """Row for row, and every manifest field but the creation time and the pass identifier (the
    fields two separate harvests cannot share)."""
    ma, mb = a.manifest.to_dict(), b.manifest.to_dict()
    for m in (ma, mb):
        m.pop("created")
        assert m.pop("pass_id")
    assert ma == mb
    for name in ("tokens", "context", "position"):
        assert np.array_equal(a.column(name, 0, a.n_rows), b.column(name, 0, b.n_rows)), name
    assert np.array_equal(a.activations(0, a.n_rows).numpy(), b.activations(0, b.n_rows).numpy())


def test_harvest_to_bucket_equals_harvest_to_disk(tiny_model, token_dataset, tmp_path, s3):
    client, bucket = s3
    run_harvest(*_args(tiny_model, token_dataset, str(tmp_path / "local")), "--format", "zarr")
    url = f"s3://{bucket}/dumps/tiny"
    result = run_harvest(*_args(tiny_model, token_dataset, url))
    assert "written as zarr" in result.output  # chosen automatically, with a note
    remote = open_dump(url, verify=True)
    assert remote.remote and str(remote.path) == url
    _same_dump(remote, open_dump(tmp_path / "local", verify=True))
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert "dumps/tiny/manifest.json" in keys
    assert {k.split("/")[2] for k in keys} == {"manifest.json"} | {f"shard_00000{i}.zarr" for i in range(4)}
    # Asking for safetensors in object storage is refused in one line.
    refused = run_harvest(*_args(tiny_model, token_dataset, url), "--format", "safetensors", expect_ok=False)
    assert refused.exit_code == 2 and "zarr" in refused.output


def test_killed_harvest_resumes_in_the_bucket(tiny_model, token_dataset, tmp_path, s3, monkeypatch):
    client, bucket = s3
    ref_url, url = f"s3://{bucket}/ref", f"s3://{bucket}/run"
    run_harvest(*_args(tiny_model, token_dataset, ref_url))
    real_write = harvest.writer.ShardWriter._write
    calls = {"n": 0}

    def failing_write(self, buf):
        calls["n"] += 1
        if calls["n"] == 3:  # dies half-way through the third shard: some of its objects exist
            raise OSError("simulated crash")
        real_write(self, buf)

    monkeypatch.setattr(harvest.writer.ShardWriter, "_write", failing_write)
    crashed = run_harvest(*_args(tiny_model, token_dataset, url), expect_ok=False)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    monkeypatch.setattr(harvest.writer.ShardWriter, "_write", real_write)
    # Leftover objects of the shard in flight, which no manifest lists.
    client.put_object(Bucket=bucket, Key="run/shard_000002.zarr/activations/c/0/0", Body=b"partial")
    partial = json.loads(client.get_object(Bucket=bucket, Key="run/manifest.json")["Body"].read())
    assert not partial["complete"] and len(partial["shards"]) == 2
    with pytest.raises(DumpError, match="incomplete"):
        open_dump(url)
    refused = run_harvest(*_args(tiny_model, token_dataset, url), expect_ok=False)
    assert refused.exit_code == 2 and "--resume" in refused.output
    run_harvest(*_args(tiny_model, token_dataset, url), "--resume")
    a, b = open_dump(url, verify=True), open_dump(ref_url, verify=True)
    assert a.manifest.created == partial["created"]  # the same dump, continued
    assert a.manifest.pass_id == partial["pass_id"] != b.manifest.pass_id
    _same_dump(a, b)
    # --overwrite deletes the dump's objects (and only those) and starts again.
    client.put_object(Bucket=bucket, Key="run/notes.txt", Body=b"mine")
    run_harvest(*_args(tiny_model, token_dataset, url, tokens=320), "--overwrite")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert "run/notes.txt" in keys and not any(k.startswith("run/shard_000002") for k in keys)
    assert open_dump(url).n_rows == 320


def _train(*args: str):
    return CliRunner().invoke(train_main, ["--quiet", *args], catch_exceptions=False)


TRAIN = ["--d-in", "32", "--expansion-factor", "2", "--train-batch-size", "64", "--device", "cpu",
         "--total-training-tokens", "2048", "--seed", "3", "--eval-holdout-contexts", "2",
         "--feature-sampling-window", "20", "--dead-feature-window", "10", "--resample-sample-rows", "256",
         "--shuffle-buffer-rows", "512", "--n-checkpoints", "0"]


def test_train_from_bucket_equals_train_from_disk(tiny_model, token_dataset, tmp_path, s3, monkeypatch):
    client, bucket = s3
    url = f"s3://{bucket}/d"
    args = _args(tiny_model, token_dataset, url, tokens=1600, shard_rows=512)
    run_harvest(*args)
    local = tmp_path / "copy"  # the same dump copied to disk, object by object
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="d/")["Contents"]:
        dest = local / obj["Key"][2:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    monkeypatch.setenv("MATS_SAE_CHUNK_CACHE", str(tmp_path / "cache"))  # chunks kept for a second run
    remote_run = _train("--shards", url, "--checkpoint-path", str(tmp_path / "r1"), *TRAIN)
    assert remote_run.exit_code == 0, remote_run.output
    cached = sorted((tmp_path / "cache").glob("*/*.npy"))
    assert cached
    np.save(cached[0], np.zeros((1, 32), np.float32))  # damaged: fetched again, not used
    again = _train("--shards", url, "--checkpoint-path", str(tmp_path / "r3"), *TRAIN)
    assert again.exit_code == 0, again.output
    monkeypatch.delenv("MATS_SAE_CHUNK_CACHE")
    monkeypatch.setenv("MATS_SAE_READ", "chunks")  # the bucket's read order, from the disk copy
    local_run = _train("--shards", str(local), "--checkpoint-path", str(tmp_path / "r2"), *TRAIN)
    assert local_run.exit_code == 0, local_run.output
    w1 = (tmp_path / "r1" / "final" / "sae_weights.safetensors").read_bytes()
    w2 = (tmp_path / "r2" / "final" / "sae_weights.safetensors").read_bytes()
    assert w1 == w2
    assert (tmp_path / "r3" / "final" / "sae_weights.safetensors").read_bytes() == w1
    cfg = json.loads((tmp_path / "r1" / "final" / "cfg.json").read_text())
    assert cfg["shards"] == url  # recorded as given: evaluate finds it again
    from train.evaluation.cli import main as evaluate_main

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # the option instead of the environment
    storage.reset_stores()
    endpoint = storage.endpoint()
    evaluated = CliRunner().invoke(evaluate_main, [str(tmp_path / "r1"), "--no-model", "--quiet",
                                                   "--s3-endpoint", s3[0].meta.endpoint_url])
    storage.set_endpoint(endpoint)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "r1" / "eval.json").read_text())["dump"] == url


def test_aligned_loader_reads_bucket_dumps_of_different_widths(tiny_model, token_dataset, s3, monkeypatch):
    """Two hooks of one pass in the bucket (whole chunks, of 2048 rows at d_in 32 and 1024 at 128):
    one aligned stream, in the order a local copy read the same way gives."""
    import itertools

    from shared import shard_files
    from train.loader import AlignedLoader

    monkeypatch.setattr(shard_files, "REMOTE_CHUNK_BYTES", 1 << 18)
    _, bucket = s3
    dumps = [open_dump(f) for f in harvest_pass(tiny_model, token_dataset, f"s3://{bucket}/p", tokens=3200)]
    assert [d.shard(0).activations.chunks[0] for d in dumps] == [2048, 1024]
    loader = AlignedLoader(dumps, batch_size=96, seed=4, buffer_rows=960)
    assert loader.whole_chunks
    assert list(loader._blocks()[1]) == [2048, 432, 620]  # the narrow dump's chunks, for both
    batches = list(itertools.islice(loader.batches(), 40))  # more than an epoch of 3100 rows
    assert assert_aligned(dumps, batches) == sum(len(b[0]) for b in batches)
    wide_first = AlignedLoader(dumps[::-1], batch_size=96, seed=4, buffer_rows=960)
    for a, b in zip(batches, itertools.islice(wide_first.batches(), 40)):
        assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])


def test_corrupted_object_is_named_by_train(tiny_model, token_dataset, tmp_path, s3):
    client, bucket = s3
    url = f"s3://{bucket}/d"
    run_harvest(*_args(tiny_model, token_dataset, url))
    key = "d/shard_000001.zarr/activations/c/0/0"
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    result = _train("--shards", url, "--checkpoint-path", str(tmp_path / "run"), *TRAIN)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error: ")
    assert f"s3://{bucket}/{key}" in lines[0] and "Traceback" not in result.output


def test_storage_failures_are_one_line_errors(tiny_model, token_dataset, tmp_path, s3, monkeypatch):
    _, bucket = s3
    out = ["--checkpoint-path", str(tmp_path / "run"), *TRAIN]
    missing = _train("--shards", "s3://no-such-bucket/d", *out)
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    harvested = run_harvest(*_args(tiny_model, token_dataset, "s3://no-such-bucket/d"), expect_ok=False)
    assert harvested.exit_code == 2 and "does not exist" in harvested.output
    not_a_dump = _train("--shards", f"s3://{bucket}/nothing", *out)
    assert not_a_dump.exit_code == 2 and "not a dump" in not_a_dump.output
    # Nothing listens on the endpoint.
    storage.reset_stores()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_free_port()}")
    unreachable = _train("--shards", f"s3://{bucket}/d", *out)
    assert unreachable.exit_code == 2 and "cannot reach" in unreachable.output
    assert len(unreachable.output.strip().splitlines()) == 1


def test_bad_credentials_are_one_line_errors(tiny_model, token_dataset, tmp_path, monkeypatch):
    # A server that checks keys: moto knows no access key but the ones it issued.
    proc, url = _start_moto(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        storage.reset_stores()
        result = run_harvest(*_args(tiny_model, token_dataset, "s3://some-bucket/d"), "--s3-endpoint", url,
                             expect_ok=False)
        assert result.exit_code == 2 and "access key" in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith("harvest: error: ")
        assert "Traceback" not in result.output
        # No credentials at all, anywhere boto3 looks.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        storage.reset_stores()
        none = _train("--shards", "s3://some-bucket/d", "--checkpoint-path", str(tmp_path / "run"), *TRAIN)
        assert none.exit_code == 2 and "credentials" in none.output, none.output
    finally:
        storage.set_endpoint(None)
        storage.reset_stores()
        proc.terminate()
        proc.wait(timeout=10)


def test_harvest_split_over_processes_into_the_bucket(tiny_model, token_dataset, tmp_path, s3):
    """torchrun with 2 ranks straight into the bucket: the dump of one process, and a rank that
    dies leaves shards (recorded by entry objects) that a resume keeps."""
    from test_distributed import _DYING_RANK, REPO, torchrun

    client, bucket = s3
    ref, url, killed = (f"s3://{bucket}/{n}" for n in ("one", "two", "killed"))
    # 32 contexts of 32 rows; batches of 5 contexts = 160 rows; shards of 2 batches: 320, 320, 320, 64.
    args = _args(tiny_model, token_dataset, ref, shard_rows=320)
    run_harvest(*args)
    torchrun(["-m", "harvest", "--quiet", "--device", "cpu", *_args(tiny_model, token_dataset, url, shard_rows=320)])
    _same_dump(open_dump(url, verify=True), open_dump(ref, verify=True))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="two/")["Contents"]]
    assert not any(".harvest-shards" in k for k in keys)  # rank 0 removed the entries when complete

    script = tmp_path / "dying_harvest.py"
    script.write_text(_DYING_RANK.format(repo=str(REPO)))
    died = torchrun([str(script), "--quiet", "--device", "cpu", *_args(tiny_model, token_dataset, killed, shard_rows=320)],
                    expect_ok=False)
    assert died.returncode != 0
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="killed/")["Contents"]]
    assert "killed/.harvest-shards/000001.json" in keys  # rank 1's first shard, recorded
    kept = "killed/shard_000001.zarr/zarr.json"
    before = client.head_object(Bucket=bucket, Key=kept)["ETag"], client.head_object(Bucket=bucket, Key=kept)["LastModified"]
    begun = json.loads(client.get_object(Bucket=bucket, Key="killed/manifest.json")["Body"].read())["pass_id"]
    time.sleep(1.1)  # LastModified has whole seconds
    run_harvest(*_args(tiny_model, token_dataset, killed, shard_rows=320), "--resume")  # one process: another N
    _same_dump(open_dump(killed, verify=True), open_dump(ref, verify=True))
    assert open_dump(killed).manifest.pass_id == begun
    after = client.head_object(Bucket=bucket, Key=kept)["ETag"], client.head_object(Bucket=bucket, Key=kept)["LastModified"]
    assert after == before  # the finished shard was kept, not written again
