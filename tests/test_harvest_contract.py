"""The dump contract: what is on disk equals a forward pass, and resumes are byte-identical."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import dump_files, run_harvest
from shared.reader import open_dump

pytestmark = pytest.mark.usefixtures("one_thread")


def _common(model: Path, ds: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size", "32",
            "--batch-size", "4", "--tokens", "1000", "--shard-rows", "300", *extra]


def _direct_forward(model_dir: Path, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu")
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens, names_filter=[hook])
    return cache[hook]


@pytest.mark.parametrize("skip_bos", [False, True])
def test_dump_equals_direct_forward(tiny_model, token_dataset, tmp_path, skip_bos):
    out = tmp_path / "dump"
    run_harvest(*_common(tiny_model, token_dataset, out, "--skip-bos" if skip_bos else "--keep-bos"))
    dump = open_dump(out, verify=True)
    m = dump.manifest
    assert m.complete and m.n_contexts == 32 and m.context_size == 32  # ceil(1000 / 32) contexts
    assert m.n_tokens == 1024  # the first whole context at or past --tokens 1000
    assert m.n_rows == 32 * (31 if skip_bos else 32) == dump.n_rows
    # Rebuild each context from the stored token ids, run the full model (no stop_at_layer), compare.
    tokens = dump.column("tokens", 0, dump.n_rows)
    ctx = dump.column("context", 0, dump.n_rows)
    pos = dump.column("position", 0, dump.n_rows)
    assert (np.bincount(ctx) == m.rows_per_context).all()
    grid = np.zeros((m.n_contexts, m.context_size), dtype=np.int64)
    grid[ctx, pos] = tokens
    if skip_bos:
        assert pos.min() == 1
        grid[:, 0] = m.bos_token_id
    assert (grid[:, 0] == m.bos_token_id).all()
    expected = _direct_forward(tiny_model, torch.from_numpy(grid), "blocks.0.hook_mlp_out")
    got = dump.activations(0, dump.n_rows)
    torch.testing.assert_close(got, expected[torch.from_numpy(ctx), torch.from_numpy(pos).long()],
                               rtol=1e-5, atol=1e-6)
    # Statistics that `train` normalizes with match the stored rows.
    torch.testing.assert_close(torch.tensor(m.stats["mean"]), got.double().mean(0).float(), rtol=1e-4, atol=1e-6)
    assert m.stats["mean_sq_norm"] == pytest.approx(float(got.double().pow(2).sum(1).mean()), rel=1e-6)


def test_shards_are_plain_safetensors(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "dump"
    run_harvest(*_common(tiny_model, token_dataset, out))
    m = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in m["shards"]] == [f"shard_{i:06d}.safetensors" for i in range(4)]
    first = load_file(out / m["shards"][0]["file"])
    assert first["activations"].shape == (300, 32) and first["activations"].dtype == np.float32
    assert first["tokens"].dtype == np.int32 and first["position"].dtype == np.int32
    assert first["context"].dtype == np.int64
    for key in ("format_version", "model", "model_fingerprint", "hook", "layer", "d_in", "dtype",
                "context_size", "dataset", "split", "column", "tokenizer", "prepend_bos", "skip_bos",
                "n_rows", "n_contexts", "n_tokens", "stats", "harvest_config", "versions", "created"):
        assert key in m, key


def test_multi_hook_equals_single_hooks(tiny_model, token_dataset, tmp_path):
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
    multi = tmp_path / "multi"
    run_harvest(*_common(tiny_model, token_dataset, multi), "--hook", hooks[0], "--hook", hooks[1])
    for hook in hooks:
        single = tmp_path / hook
        run_harvest(*_common(tiny_model, token_dataset, single), "--hook", hook)
        a, b = dump_files(multi / hook), dump_files(single)
        shards = [k for k in a if k.startswith("shard_")]
        assert shards and all(a[k] == b[k] for k in shards)
        assert sorted(a) == sorted(b)


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_bfloat16_and_zarr_round_trip(tiny_model, token_dataset, tmp_path, fmt):
    ref = tmp_path / "ref"
    run_harvest(*_common(tiny_model, token_dataset, ref))
    out = tmp_path / "bf16"
    extra = ["--format", fmt, "--dtype", "bfloat16"] + (["--compression", "zstd"] if fmt == "zarr" else [])
    run_harvest(*_common(tiny_model, token_dataset, out, *extra))
    a, b = open_dump(ref), open_dump(out, verify=True)
    assert b.manifest.format == fmt and b.dtype == "bfloat16"
    got = b.activations(0, b.n_rows)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, a.activations(0, a.n_rows).to(torch.bfloat16))
    assert (a.column("tokens", 0, a.n_rows) == b.column("tokens", 0, b.n_rows)).all()


def test_raw_text_is_tokenized_and_packed(tiny_model, text_dataset, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "text"
    result = run_harvest("--model", str(tiny_model), "--dataset", str(text_dataset), "--out", str(out),
                         "--context-size", "16", "--tokens", "160", "--shard-rows", "1000")
    assert "raw text column 'text'" in result.output
    dump = open_dump(out)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    docs = [json.loads(line)["text"] for line in text_dataset.read_text().splitlines()]
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"]]
    # Concatenate, split into 15-token pieces, BOS at each context start.
    expected = np.array([[0] + stream[i * 15 : (i + 1) * 15] for i in range(10)]).reshape(-1)
    assert (dump.column("tokens", 0, dump.n_rows) == expected).all()


def test_shuffle_documents_is_seeded(tiny_model, token_dataset, tmp_path):
    def tokens(seed: str, shuffle: bool) -> np.ndarray:
        out = tmp_path / f"{seed}_{shuffle}"
        run_harvest(*_common(tiny_model, token_dataset, out), "--seed", seed,
                    "--shuffle-documents" if shuffle else "--no-shuffle-documents", "--shuffle-buffer-docs", "16")
        dump = open_dump(out)
        return dump.column("tokens", 0, dump.n_rows)

    plain = tokens("1", False)
    a, b, c = tokens("1", True), tokens("1", True), tokens("2", True)
    assert np.array_equal(a, b)  # same seed, same order
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
