"""The seed's Python API: its README example runs with only model, dataset and device changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, write_token_dataset
from shared.reader import open_dump


@pytest.mark.slow  # an SAE of 512 x 32768 on batches of 4096 rows: about a minute on 2 cores
def test_seed_readme_example_runs(tmp_path, monkeypatch):
    # The seed's example trains on 50M tokens for 15 minutes on an A100; a CPU test keeps its
    # settings but harvests and trains 8,192 tokens (2 steps of 4096), offline wandb included.
    run_seed_example(tmp_path, monkeypatch, d_model=512, expansion_factor=64, train_batch_size=4096,
                     context_size=128)


def test_seed_readme_example_runs_small(tmp_path, monkeypatch, one_thread):
    """The same example and checks at tiny sizes (the fast tier's check of the seed's API)."""
    run_seed_example(tmp_path, monkeypatch, d_model=32, expansion_factor=2, train_batch_size=64,
                     context_size=32)


def run_seed_example(tmp_path, monkeypatch, d_model: int, expansion_factor: int, train_batch_size: int,
                     context_size: int) -> None:
    """The seed README's example with the model, dataset and device changed, and these four sizes;
    harvests 2 steps' tokens plus one held-out context, trains 2 steps, loads the session back."""
    model_dir = make_tiny_model(tmp_path / f"model_{d_model}", n_layer=1, d_model=d_model, n_ctx=context_size)
    dataset = write_token_dataset(tmp_path / "ds", n_docs=80, doc_len=context_size, vocab=30)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")

    from train import LanguageModelSAERunnerConfig, language_model_sae_runner

    cfg = LanguageModelSAERunnerConfig(
        # Data Generating Function (Model + Training Distibuion)
        model_name=str(model_dir),  # changed: "gelu-2l"
        hook_point="blocks.0.hook_mlp_out",
        hook_point_layer=0,
        d_in=d_model,
        dataset_path=str(dataset),  # changed: "NeelNanda/c4-tokenized-2b"
        is_dataset_tokenized=True,
        # SAE Parameters
        expansion_factor=expansion_factor,
        # Training Parameters
        lr=1e-4,
        l1_coefficient=3e-4,
        train_batch_size=train_batch_size,
        context_size=context_size,
        # Activation Store Parameters
        n_batches_in_buffer=24,
        total_training_tokens=2 * train_batch_size,  # changed: 5_000_00 * 100
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
    assert sparse_autoencoder.cfg.d_in == d_model and sparse_autoencoder.cfg.d_sae == d_model * expansion_factor
    dump = open_dump(tmp_path / "data" / f"model{d_model}_l0")  # harvested because it was missing
    assert dump.n_rows == 2 * train_batch_size + context_size  # + 1 held-out context
    assert dump.manifest.hook == "blocks.0.hook_mlp_out"
    assert (tmp_path / "checkpoints" / "final" / "sae_weights.safetensors").is_file()
    assert list((tmp_path / "checkpoints").glob("wandb/offline-run-*"))
    rows = [json.loads(line) for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and rows[-1]["tokens"] == 2 * train_batch_size

    from train import LMSparseAutoencoderSessionloader

    model, sae, loader = LMSparseAutoencoderSessionloader.load_session_from_pretrained(
        tmp_path / "checkpoints" / "final", device="cpu")
    assert torch.equal(sae.W_dec, sparse_autoencoder.W_dec)
    batch = next(loader.batches())
    assert batch.shape == (train_batch_size, d_model)
    # The loaded model is the one the dump came from: its hook output matches the dump.
    tokens = torch.from_numpy(dump.column("tokens", 0, context_size)).long()[None]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"][0], dump.activations(0, context_size),
                               rtol=1e-5, atol=1e-5)


def doc_example(heading: str) -> str:
    """The first python block under `heading` in docs/python-api.md."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    section = doc[doc.index(heading):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_session_example_runs_and_its_store_yields_training_batches(tmp_path, monkeypatch, one_thread,
                                                                         tiny_model, token_dataset):
    """The docs' session example on a tiny dump and run; its store's batches are those training read
    (the same plan_data loader), its SAE's output the documented named tuple."""
    from itertools import islice

    from helpers import run_harvest
    from shared.saes import SAEOutput
    from train import ActivationsStore, LanguageModelSAERunnerConfig
    from train.run import plan_data, train

    run_harvest("--model", str(tiny_model), "--dataset", str(token_dataset), "--out", str(tmp_path / "dump"),
                "--context-size", "32", "--batch-size", "5", "--tokens", "3200")
    monkeypatch.chdir(tmp_path)
    # Held-out contexts and a buffer smaller than the rows: an order that ignored either would differ.
    cfg = LanguageModelSAERunnerConfig(shards=str(tmp_path / "dump"), checkpoint_path="checkpoints",
                                       expansion_factor=2, train_batch_size=64, total_training_tokens=640,
                                       shuffle_buffer_rows=512, shuffle_block_rows=4, eval_holdout_contexts=5,
                                       device="cpu", seed=3)
    train(cfg, progress=False)
    printed: list = []
    namespace = {"print": lambda *a: printed.append(a)}
    exec(compile(doc_example("## A trained SAE"), "docs/python-api.md", "exec"), namespace)

    store, sae = namespace["activations_store"], namespace["sae"]
    assert isinstance(store, ActivationsStore) and len(printed) == 3
    plan = plan_data(cfg, verify=False)
    assert store.dump.path.resolve() == (tmp_path / "dump").resolve() and store.n_rows == plan.loader.n_rows
    training = plan.loader.batches()
    first = namespace["batch"]  # the loop's last batch: the fourth of the run
    expected = list(islice(training, 5))
    assert first.shape == (64, 32) and torch.equal(first, expected[3])
    assert torch.equal(store.next_batch(), expected[4])  # next_batch and iteration share one stream
    assert torch.equal(next(iter(store)), next(training))
    out = sae(expected[0])
    assert isinstance(out, SAEOutput) and out._fields == ("sae_out", "feature_acts")
    assert out.sae_out.shape == (64, 32) and out.feature_acts.shape == (64, sae.cfg.d_sae)
