"""An object store that accepts connections and never answers: each command says on stderr that it
is waiting (the time so far, the attempt, the bound), then fails in one line naming the bound,
within the bound it was given (MATS_SAE_S3_TIMEOUT or --s3-timeout), instead of staying silent
for minutes. A bound that is no number of seconds is one line too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fault._support import REPO, SilentStore, command_env, tiny_checkpointed_run
from test_object_storage import moto_url  # noqa: F401  (the moto server)

# Slow tier: the fault suite, real processes (tests/README.md).
pytestmark = pytest.mark.slow

BOUND = "2"  # seconds: the whole wait of a request, retries included
WAITING = "object storage: no answer from "


@pytest.fixture(scope="module")
def store():
    with SilentStore() as s:
        yield s


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_checkpointed_run(tmp_path_factory.mktemp("storage_waits"), "run", 7)


def start(prog: str) -> list[str]:
    module = {"train": "train", "harvest": "harvest"}.get(prog)
    return [sys.executable, "-m", module] if module else [sys.executable, "-c",
                                                          "from train.evaluation.cli import main; main()"]


# name -> (command, its arguments given the store's URL and the tmp folder, the environment's bound)
CASES = {
    "train-reads-its-dump": ("train", lambda url, tmp, run, model, text: ["--shards", "s3://bucket/dump", "--s3-endpoint", url,
                                                             "--checkpoint-path", tmp / "out", "--device", "cpu"],
                             BOUND),
    "train-bound-from-the-flag": ("train", lambda url, tmp, run, model, text: ["--shards", "s3://bucket/dump", "--s3-endpoint", url,
                                                                  "--s3-timeout", BOUND, "--checkpoint-path",
                                                                  tmp / "out", "--device", "cpu"], "600"),
    "evaluate-reads-the-dump": ("evaluate", lambda url, tmp, run, model, text: [run, "--shards", "s3://bucket/dump", "--s3-endpoint",
                                                                   url, "--no-model", "--device", "cpu"], BOUND),
    "harvest-writes-its-dump": ("harvest", lambda url, tmp, run, model, text: ["--model", model, "--dataset",
                                                                  text, "--out", "s3://bucket/h",
                                                                  "--s3-endpoint", url, "--context-size", "16",
                                                                  "--batch-size", "2", "--tokens", "256", "--device",
                                                                  "cpu", "--quiet"], BOUND),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_store_that_never_answers_is_said_then_refused(store, run, tiny_model, text_dataset, tmp_path, name):
    prog, args, bound = CASES[name]
    argv = [str(a) for a in args(store.url, tmp_path, run, tiny_model, text_dataset)]
    got = subprocess.run([*start(prog), *argv], env=command_env(MATS_SAE_S3_TIMEOUT=bound), cwd=REPO,
                         capture_output=True, text=True, timeout=240)  # 60 s a request without the bound
    shown = f"{prog} {' '.join(argv)} -> exit {got.returncode}\nstderr:\n{got.stderr}"
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert got.returncode == 2 and "Traceback" not in got.stderr, shown
    waits = [line for line in lines if line.startswith(WAITING)]
    assert waits, "no line while it waited\n" + shown
    assert store.url in waits[0] and f"giving up after {BOUND} s" in waits[0] and "MATS_SAE_S3_TIMEOUT" in waits[0], shown
    assert sum(line.startswith(f"{prog}: error:") for line in lines) == 1, "not one error line\n" + shown
    last = lines[-1]
    assert last.startswith(f"{prog}: error:") and f"within {BOUND} s" in last and "MATS_SAE_S3_TIMEOUT" in last, shown
    assert store.url in last, shown


@pytest.mark.parametrize("where", ["environment", "flag"])
def test_a_bound_that_is_no_number_of_seconds_is_one_line(store, tmp_path, where):
    extra = ["--s3-timeout", "0"] if where == "flag" else []
    argv = ["--shards", "s3://bucket/dump", "--s3-endpoint", store.url, *extra, "--checkpoint-path",
            str(tmp_path / "out"), "--device", "cpu"]
    got = subprocess.run([*start("train"), *argv], env=command_env(MATS_SAE_S3_TIMEOUT="soon"), cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    lines = [line for line in got.stderr.splitlines() if line.strip()]
    assert got.returncode == 2 and "Traceback" not in got.stderr and lines, got.stderr
    name = "--s3-timeout" if where == "flag" else "MATS_SAE_S3_TIMEOUT"
    assert name in lines[-1] and lines[-1].startswith(("train: error:", "Error: ")), got.stderr


def test_a_store_paused_mid_harvest_is_said_and_the_harvest_completes(moto_url, tiny_model, text_dataset, tmp_path,
                                                                      monkeypatch):
    """The store stops answering once the harvest has sent some of its dump and comes back after
    a pause shorter than the bound: harvest says it is waiting while it waits, then finishes, and
    the dump it wrote is whole (every checksum verified)."""
    import boto3
    from urllib.parse import urlparse

    from fault._support import PausingProxy
    from shared import storage
    from shared.reader import open_dump

    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="paused")
    up = urlparse(moto_url)
    proxy = PausingProxy((up.hostname, up.port), pause_after=40_000, pause_s=8.0)
    try:
        argv = ["--model", str(tiny_model), "--dataset", str(text_dataset), "--out", "s3://paused/h",
                "--s3-endpoint", proxy.url, "--context-size", "16", "--batch-size", "4", "--tokens", "1024",
                "--shard-rows", "256", "--device", "cpu", "--quiet"]
        got = subprocess.run([*start("harvest"), *argv], env=command_env(MATS_SAE_S3_TIMEOUT="20"), cwd=REPO,
                             capture_output=True, text=True, timeout=240)
    finally:
        proxy.close()
    shown = f"exit {got.returncode}\nstderr:\n{got.stderr}"
    assert proxy.paused, "the harvest sent too little to reach the pause\n" + shown
    assert got.returncode == 0 and "Traceback" not in got.stderr, shown
    waits = [line for line in got.stderr.splitlines() if line.startswith(WAITING)]
    assert waits and proxy.url in waits[0] and "giving up after 20 s" in waits[0], shown
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    storage.set_endpoint(moto_url)
    storage.reset_stores()
    try:
        dump = open_dump("s3://paused/h", verify=True)
        assert dump.n_rows > 0 and dump.manifest.complete
    finally:
        storage.set_endpoint(None)
        storage.reset_stores()
