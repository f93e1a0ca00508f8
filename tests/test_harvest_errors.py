"""Bad input gets a one-line error and leaves nothing that looks like a complete dump."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from helpers import run_harvest
from shared.errors import DumpError
from shared.reader import open_dump

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(model: Path, ds: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size", "32",
            "--batch-size", "4", "--tokens", "1000", "--shard-rows", "300", *extra]


def _fails(args: list[str], *needles: str) -> str:
    result = run_harvest(*args, expect_ok=False)
    assert result.exit_code == 2, result.output
    err = [line for line in result.output.splitlines() if line.startswith("harvest: error:")]
    assert len(err) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_unknown_hook_lists_nearest(tiny_model, token_dataset, tmp_path):
    _fails(_args(tiny_model, token_dataset, tmp_path / "o", "--hook", "blocks.0.hook_mlp_outt"),
           "unknown hook", "blocks.0.hook_mlp_out")
    assert not (tmp_path / "o").exists()


def test_context_size_above_n_ctx(tiny_model, token_dataset, tmp_path):
    _fails(_args(tiny_model, token_dataset, tmp_path / "o") + ["--context-size", "65"], "n_ctx 64")
    assert not (tmp_path / "o").exists()


def test_dataset_without_needed_column(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"body": "the cat"}) for _ in range(5)))
    _fails(_args(tiny_model, path, tmp_path / "o"), "text column 'text'", "body", "--text-column")


def test_too_few_tokens_known_up_front(tiny_model, token_dataset, tmp_path):
    _fails(_args(tiny_model, token_dataset, tmp_path / "o") + ["--tokens", "100000"], "--tokens")
    assert not (tmp_path / "o").exists()


def test_too_few_tokens_found_while_streaming(tiny_model, text_dataset, tmp_path):
    out = tmp_path / "o"
    _fails(_args(tiny_model, text_dataset, out) + ["--tokens", "100000"], "holds only", "--tokens")
    with pytest.raises(DumpError, match="incomplete"):
        open_dump(out)


def test_out_holding_a_different_dump(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "o"
    run_harvest(*_args(tiny_model, token_dataset, out))
    before = (out / "manifest.json").read_bytes()
    for flag in ([], ["--resume"]):
        _fails(_args(tiny_model, token_dataset, out) + ["--tokens", "500", *flag], "different dump", "--overwrite")
    assert (out / "manifest.json").read_bytes() == before
    run_harvest(*_args(tiny_model, token_dataset, out), "--tokens", "500", "--overwrite")
    assert open_dump(out).manifest.n_contexts == 16


def test_out_is_a_file(tiny_model, token_dataset, tmp_path):
    (tmp_path / "o").write_text("mine")
    _fails(_args(tiny_model, token_dataset, tmp_path / "o"), "is a file")
    assert (tmp_path / "o").read_text() == "mine"


def test_out_holding_other_files(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails(_args(tiny_model, token_dataset, out, "--overwrite"), "not a dump")
    assert (out / "notes.txt").read_text() == "mine"


def test_non_finite_activations_name_shard_and_row(token_dataset, tmp_path):
    from transformers import GPT2LMHeadModel

    model_dir = make_tiny_model(tmp_path / "nan_model")
    hf = GPT2LMHeadModel.from_pretrained(model_dir)
    with torch.no_grad():
        hf.transformer.wte.weight[7] = float("nan")  # every position holding token 7 goes NaN
    hf.save_pretrained(model_dir)
    out = tmp_path / "o"
    line = _fails(_args(model_dir, token_dataset, out), "non-finite", "shard_000000", "row")
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"] == []
    assert "context 0" in line or "context" in line


@pytest.mark.parametrize("flags, needle", [
    (["--tokens", "0"], "tokens must be positive"),
    (["--batch-size", "-1"], "batch-size must be positive"),
    (["--compression", "zstd"], "zarr only"),
    (["--resume", "--overwrite"], "contradict"),
    (["--no-prepend-bos", "--skip-bos"], "needs --prepend-bos"),
])
def test_bad_options(tiny_model, token_dataset, tmp_path, flags, needle):
    _fails(_args(tiny_model, token_dataset, tmp_path / "o") + flags, needle)


def test_reader_names_truncated_and_corrupted_shards(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "o"
    run_harvest(*_args(tiny_model, token_dataset, out))
    shard = out / "shard_000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the activations: only the checksum can tell
    shard.write_bytes(bytes(data))
    open_dump(out)  # structure still fine
    with pytest.raises(DumpError, match="shard_000001.safetensors fails its checksum"):
        open_dump(out, verify=True)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(DumpError, match="shard_000001.safetensors is truncated"):
        open_dump(out)
    shard.unlink()
    with pytest.raises(DumpError, match="shard_000001.safetensors is missing"):
        open_dump(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_asked_without_cuda(tiny_model, token_dataset, tmp_path):
    _fails(_args(tiny_model, token_dataset, tmp_path / "o", "--device", "cuda"), "CUDA is not available")
    _fails(_args(tiny_model, token_dataset, tmp_path / "o", "--device", "tpu9"), "device")
