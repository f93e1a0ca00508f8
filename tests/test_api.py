"""The seed's Python API: its README example runs with only model, dataset and device changed."""
from __future__ import annotations

import json

import torch

from conftest import make_tiny_model, write_token_dataset
from shared.reader import open_dump


def test_seed_readme_example_runs(tmp_path, monkeypatch):
    # The seed's example trains on 50M tokens for 15 minutes on an A100; a CPU test keeps its
    # settings but harvests and trains 8,192 tokens (2 steps of 4096), offline wandb included.
    model_dir = make_tiny_model(tmp_path / "model_512", n_layer=1, d_model=512, n_ctx=128)
    dataset = write_token_dataset(tmp_path / "ds", n_docs=80, doc_len=128, vocab=30)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")

    from train import LanguageModelSAERunnerConfig, language_model_sae_runner

    cfg = LanguageModelSAERunnerConfig(
        # Data Generating Function (Model + Training Distibuion)
        model_name=str(model_dir),  # changed: "gelu-2l"
        hook_point="blocks.0.hook_mlp_out",
        hook_point_layer=0,
        d_in=512,
        dataset_path=str(dataset),  # changed: "NeelNanda/c4-tokenized-2b"
        is_dataset_tokenized=True,
        # SAE Parameters
        expansion_factor=64,
        # Training Parameters
        lr=1e-4,
        l1_coefficient=3e-4,
        train_batch_size=4096,
        context_size=128,
        # Activation Store Parameters
        n_batches_in_buffer=24,
        total_training_tokens=8192,  # changed: 5_000_00 * 100
        store_batch_size=32,
        # Resampling protocol
        feature_sampling_method="l2",
        feature_sampling_window=1000,
        feature_reinit_scale=0.2,
        dead_feature_threshold=1e-8,
        # WANDB
        log_to_wandb=True,
        wandb_project="mats_sae_training_language_models",
        wandb_entity=None,
        # Misc
        device="cpu",  # changed: "cuda"
        seed=42,
        n_checkpoints=5,
        checkpoint_path="checkpoints",
        dtype=torch.float32,
    )
    sparse_autoencoder = language_model_sae_runner(cfg)
    assert sparse_autoencoder.cfg.d_in == 512 and sparse_autoencoder.cfg.d_sae == 32768
    dump = open_dump(tmp_path / "data" / "model512_l0")  # harvested because it was missing
    assert dump.n_rows == 8192 + 128 and dump.manifest.hook  # + 1 held-out context == "blocks.0.hook_mlp_out"
    assert (tmp_path / "checkpoints" / "final" / "sae_weights.safetensors").is_file()
    assert list((tmp_path / "checkpoints").glob("wandb/offline-run-*"))
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["tokens"] == 8192

    from train import LMSparseAutoencoderSessionloader

    model, sae, loader = LMSparseAutoencoderSessionloader.load_session_from_pretrained(
        tmp_path / "checkpoints" / "final", device="cpu")
    assert torch.equal(sae.W_dec, sparse_autoencoder.W_dec)
    batch = next(loader.batches())
    assert batch.shape == (4096, 512)
    # The loaded model is the one the dump came from: its hook output matches the dump.
    tokens = torch.from_numpy(dump.column("tokens", 0, 128)).long()[None]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"][0], dump.activations(0, 128), rtol=1e-5, atol=1e-5)
