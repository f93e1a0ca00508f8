"""Sparse probing (train/evaluation/sparse_probing.py) on planted data where the answer is known,
and `evaluate --sparse-probing` end to end on a tiny trained SAE."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import run_harvest
from shared.sae import SAEConfig, SparseAutoencoder
from train.evaluation.sparse_probing import (KS, TASKS, balanced_sample, probe_accuracy, sparse_probe,
                                             split_by_context, top_k_by_mean_diff, vocab_labels)

pytestmark = pytest.mark.usefixtures("one_thread_module")

D_IN, D_SAE, PLANTED = 64, 32, 7
HOOK = "blocks.0.hook_mlp_out"
CONTEXT, HOLDOUT = 32, 16


def planted(n: int, seed: int, gap: float = 4.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, D_IN], labels [n], unit direction u): x = noise + gap * y * u, separable along u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(D_IN, generator=torch.Generator().manual_seed(99)), dim=0)
    y = torch.arange(n) % 2 == 0
    x = torch.randn(n, D_IN, generator=g) + gap * y[:, None].float() * u
    return x, y, u


def sae_with(directions: torch.Tensor, bias: float = 0.0) -> SparseAutoencoder:
    """An SAE whose encoder columns are `directions` ([D_IN, D_SAE]), b_dec 0."""
    sae = SparseAutoencoder(SAEConfig(D_IN, D_SAE))
    with torch.no_grad():
        sae.W_enc.copy_(directions)
        sae.b_enc.fill_(bias)
        sae.b_dec.zero_()
    return sae


def random_directions(seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(D_IN, D_SAE, generator=torch.Generator().manual_seed(seed)), dim=0)


def planted_sae(u: torch.Tensor) -> SparseAutoencoder:
    w = random_directions(1)
    w[:, PLANTED] = u
    return sae_with(w, bias=-2.0)  # fires where the label's component is there


def test_raw_probe_on_separable_data_is_near_perfect():
    x, y, _ = planted(600, 0, gap=8.0)
    xt, yt, _ = planted(400, 1, gap=8.0)
    assert probe_accuracy(x, y, xt, yt) >= 0.99
    # Labels unrelated to x: chance.
    noise = torch.Generator().manual_seed(3)
    assert abs(probe_accuracy(x, torch.rand(600, generator=noise) < 0.5, xt,
                              torch.rand(400, generator=noise) < 0.5) - 0.5) < 0.1


def test_planted_feature_gives_a_one_sparse_probe_near_raw_and_a_random_sae_does_not():
    x, y, u = planted(800, 0)
    xt, yt, _ = planted(400, 1)
    got = sparse_probe(x, y, xt, yt, planted_sae(u))
    assert got["raw_accuracy"] >= 0.95
    assert got["sae_features"]["1"] == [PLANTED]
    assert got["sae_accuracy"]["1"] >= 0.95
    assert got["sae_relative"]["1"] >= 0.95
    assert set(got["sae_accuracy"]) == {str(k) for k in KS} and len(got["sae_features"]["20"]) == 20
    other = sparse_probe(x, y, xt, yt, sae_with(random_directions(2)))
    assert max(abs(float(random_directions(2)[:, i] @ u)) for i in range(D_SAE)) < 0.6  # none aligned
    assert other["sae_accuracy"]["1"] < 0.8
    assert other["sae_accuracy"]["1"] < got["sae_accuracy"]["1"] - 0.15


def test_selection_by_mean_difference_picks_the_planted_feature():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(200, 10, generator=g)
    y = torch.arange(200) % 2 == 0
    f[y, 4] += 3.0  # the largest gap
    f[~y, 8] += 1.0  # a smaller one, of the other sign: still counted (absolute difference)
    assert top_k_by_mean_diff(f, y, 1).tolist() == [4]
    assert top_k_by_mean_diff(f, y, 2).tolist() == [4, 8]
    assert len(top_k_by_mean_diff(f, y, 50)) == 10  # k capped at the number of features


def test_split_keeps_each_context_on_one_side():
    contexts = np.repeat(np.arange(20), 7)
    test = split_by_context(contexts, 0.2, seed=0)
    assert not set(contexts[test]) & set(contexts[~test])
    assert len(set(contexts[test])) == 4
    assert (split_by_context(contexts, 0.2, seed=0) == test).all()
    # Two contexts: one each side; one context: all on the train side.
    assert split_by_context(np.array([0, 0, 1, 1]), 0.01).sum() == 2
    assert split_by_context(np.array([5, 5, 5]), 0.5).sum() in (0, 3)


def test_balanced_sample_draws_as_many_of_each_class():
    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 10 == 0  # 100 positives
    candidates = np.arange(1000) < 800  # 80 of them candidates
    got = balanced_sample(labels, candidates, 1000, rng)
    assert labels[got].sum() == 80 and (~labels[got]).sum() == 80
    assert candidates[got].all() and len(set(got.tolist())) == len(got) and (np.diff(got) > 0).all()
    capped = balanced_sample(labels, candidates, 30, rng)
    assert labels[capped].sum() == 30 and len(capped) == 60


def test_vocab_labels_from_token_strings():
    class Tok:  # a byte-level-BPE-like tokenizer of five tokens, id 0 special
        all_special_ids = [0]
        strings = ["<|endoftext|>", "Ġthe", "The", ",", "of"]
        texts = ["<|endoftext|>", " the", "The", ",", "of"]

        def __len__(self):
            return len(self.strings)

        def convert_ids_to_tokens(self, ids):
            return [self.strings[i] for i in ids]

        def batch_decode(self, seqs):
            return [self.texts[s[0]] for s in seqs]

    labels, special = vocab_labels(Tok(), list(TASKS), 6)
    assert special.tolist() == [True, False, False, False, False, True]  # id 5: past the tokenizer
    assert labels["word_start"][:5].tolist() == [False, True, False, False, False]
    assert labels["capitalised"][:5].tolist() == [False, False, True, False, False]
    assert labels["punctuation"][:5].tolist() == [False, False, False, True, False]
    assert labels["short_word"][:5].tolist() == [False, False, False, False, True]


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory, vocab_size) -> Path:
    from conftest import write_token_dataset
    from train.cli import main as train_main

    root = tmp_path_factory.mktemp("probing")
    ds = write_token_dataset(root / "ds", n_docs=40, doc_len=100, vocab=vocab_size)
    run_harvest("--model", str(tiny_model), "--dataset", str(ds), "--out", str(root / "dump"), "--hook", HOOK,
                "--context-size", str(CONTEXT), "--batch-size", "4", "--tokens", "1500", "--shard-rows", "500")
    got = CliRunner().invoke(train_main, ["--shards", str(root / "dump"), "--quiet", "--device", "cpu",
                                          "--train-batch-size", "128", "--d-sae", "64", "--eval-holdout-contexts",
                                          str(HOLDOUT), "--total-training-tokens", str(128 * 8),
                                          "--checkpoint-path", str(root / "run")])
    assert got.exit_code == 0, got.output
    return root / "run"


def evaluate(*args: str) -> tuple[int, str]:
    from train.evaluation.cli import main as evaluate_main

    got = CliRunner().invoke(evaluate_main, [*map(str, args), "--no-model", "--device", "cpu"])
    return got.exit_code, got.output


def test_evaluate_sparse_probing_end_to_end(trained_run):
    code, out = evaluate(trained_run, "--sparse-probing")
    assert code == 0, out
    assert "sparse probing: reading rows" in out and "sparse probing: fitting probes" in out  # the bars
    ev = json.loads((trained_run / "eval.json").read_text())
    # The tiny word-level tokenizer has lower-case words only: just short_word has both classes.
    assert ev["sparse_probing_tasks"] == ["short_word"]
    assert set(ev["sparse_probing_skipped"]) == {"word_start", "capitalised", "punctuation"}
    for key in ["sparse_probing_raw_accuracy", *(f"sparse_probing_top_{k}_{m}" for k in KS
                                                 for m in ("accuracy", "relative"))]:
        assert isinstance(ev[key], float) and 0 <= ev[key] <= (2 if "relative" in key else 1), key
    task = ev["sparse_probing"]["short_word"]
    assert task["n_train"] % 2 == 0 and task["n_test"] % 2 == 0 and task["n_test"] >= 10
    assert task["raw_accuracy"] > 0.65  # above chance: the MLP-0 output of a random model mixes in context
    assert all(len(task["sae_features"][str(k)]) == k for k in KS)
    doc = (Path(__file__).parents[1] / "docs" / "evaluate.md").read_text()
    assert not [k for k in ev if k.startswith("sparse_probing") and f"`{k}`" not in doc]
    # A named task with too few positives: one line, no traceback.
    code, out = evaluate(trained_run, "--sparse-probing", "--probe-tasks", "capitalised", "--quiet")
    assert code == 2 and "too few rows of a class" in out and "Traceback" not in out, out
    code, out = evaluate(trained_run, "--sparse-probing", "--probe-tasks", "nonsense", "--quiet")
    assert code == 2 and "unknown sparse probing task" in out, out
    code, out = evaluate(trained_run, "--probe-tasks", "short_word", "--quiet")
    assert code == 2 and "needs --sparse-probing" in out, out


def test_summary_shows_the_sparse_probing_columns(tmp_path):
    from train.summary import COLUMNS, summary_row

    (tmp_path / "eval.json").write_text(json.dumps({"mse": 1.0, "sparse_probing_top_1_accuracy": 0.75,
                                                    "sparse_probing": {"t": {}}}))
    row = summary_row("r", tmp_path, {})
    assert row["sparse_probing_top_1_accuracy"] == 0.75 and "sparse_probing" not in row
    assert "sparse_probing_top_20_relative" in COLUMNS
