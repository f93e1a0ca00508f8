"""Feature absorption (first-letter task): planted data where the answer is known, and the CLI."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_token_dataset
from shared.errors import UserError
from shared.sae import SAEConfig, SparseAutoencoder
from train.evaluation.absorption import (ABSORPTION_KEYS, absorption_metrics, first_letter_tokens, letters_kept,
                                         split_tokens)

pytestmark = pytest.mark.usefixtures("one_thread_module")

LETTERS = "abcdef"
PER_LETTER, N_AB, D = 40, 10, 48
"""40 words a letter; 10 of the 'a' words start with 'ab' (the planted split)."""


def planted_words() -> list[str]:
    rng = random.Random(0)
    tail = lambda: "".join(rng.choice("cdefghijklmnopqrstuvwxyz") for _ in range(4))  # noqa: E731
    words = []
    for c in LETTERS:
        for i in range(PER_LETTER):
            words.append(("ab" if c == "a" and i < N_AB else c) + tail())
    return words


def directions() -> torch.Tensor:
    """[D, D] orthonormal columns: 0-5 the letters', 6 the 'ab' direction e, 7+ noise."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    return q


def planted_acts(words: list[str]) -> torch.Tensor:
    """Each word: its letter's direction, + e for the 'ab' words, + small noise off every planted direction."""
    q = directions()
    g = torch.Generator().manual_seed(2)
    rows = []
    for w in words:
        x = q[:, LETTERS.index(w[0])].clone()
        if w.startswith("ab"):
            x += q[:, 6]
        x += q[:, 7:] @ (0.05 * torch.randn(D - 7, generator=g))
        rows.append(x)
    return torch.stack(rows)


def planted_sae(split: bool) -> SparseAutoencoder:
    """Features 0-5 read and write their letter's direction (threshold 0.2). With `split`, feature
    0 ('a') does not fire on 'ab' words (its encoder subtracts 2e) and feature 6, firing on e,
    writes (d_a + e) there instead: the 'a' of the 'ab' words absorbed. Without, feature 6 reads
    and writes e alone and feature 0 fires on every 'a' word."""
    q = directions()
    sae = SparseAutoencoder(SAEConfig(D, 8))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.2)
        for j in range(len(LETTERS)):
            sae.W_enc[:, j] = q[:, j]
            sae.W_dec[j] = q[:, j]
        if split:
            sae.W_enc[:, 0] = q[:, 0] - 2 * q[:, 6]
            sae.W_enc[:, 6] = math.sqrt(2) * q[:, 6]
            sae.W_dec[6] = (q[:, 0] + q[:, 6]) / math.sqrt(2)
        else:
            sae.W_enc[:, 6] = q[:, 6]
            sae.W_dec[6] = q[:, 6]
        sae.b_enc[7] = -1.0  # feature 7 never fires
    return sae


def test_planted_split_is_absorbed_at_its_share():
    words = planted_words()
    acts = planted_acts(words)
    got = absorption_metrics(words, acts, planted_sae(split=True))
    _, test = split_tokens([w[0] for w in words], list(LETTERS), 0.2, 0)
    test_words = [words[i] for i in test]
    n_a = sum(w[0] == "a" for w in test_words)
    n_ab = sum(w.startswith("ab") for w in test_words)
    assert 0 < n_ab < n_a
    a = got["absorption_first_letter_per_letter"]["a"]
    assert a["main_feature"] == 0
    assert a["n_true_positives"] == n_a and a["n_misses"] == n_ab and a["n_absorbed"] == n_ab
    assert a["rate"] == pytest.approx(n_ab / n_a)
    assert a["f1"] == pytest.approx(2 * (n_a - n_ab) / (n_a - n_ab + n_a))
    for c in LETTERS[1:]:
        other = got["absorption_first_letter_per_letter"][c]
        assert other["rate"] == 0.0 and other["f1"] == 1.0 and other["main_feature"] == LETTERS.index(c)
    assert got["absorption_first_letter_rate"] == pytest.approx(n_ab / n_a / len(LETTERS))
    assert got["absorption_first_letter_rate_of_misses"] == pytest.approx(1.0)  # only 'a' misses, all absorbed
    assert got["absorption_first_letter_probe_accuracy"] > 0.97
    assert got["absorption_first_letter_probe_f1"] > 0.97
    assert got["absorption_first_letter_n_letters"] == len(LETTERS)
    assert got["absorption_first_letter_n_tokens"] == len(words)
    assert a["absorbing_features"] == [{"feature": 6, "n_absorbed": n_ab}]  # the planted absorber
    assert all(got["absorption_first_letter_per_letter"][c]["absorbing_features"] == [] for c in LETTERS[1:])


def test_the_absorber_recorded_is_the_one_writing_most_along_the_probe():
    """The split SAE plus feature 7, also firing on the 'ab' words (a little less than feature 6:
    1.18 against 1.21) but writing d_a alone: along the 'a' probe p (about 0.80 d_a + 0.22 e, as
    'ab' words carry e) 7 writes about 0.95, 6 about 0.87. Both pass the test; each absorbed token
    is recorded once, for 7 (the largest writer: not the most active, not the first feature)."""
    words = planted_words()
    sae = planted_sae(split=True)
    q = directions()
    with torch.no_grad():
        sae.W_enc[:, 7] = 1.38 * q[:, 6]
        sae.b_enc[7] = -0.2
        sae.W_dec[7] = q[:, 0]
    acts = planted_acts(words)
    a = absorption_metrics(words, acts, sae)["absorption_first_letter_per_letter"]["a"]
    f = sae.encode(acts[[i for i, w in enumerate(words) if w.startswith("ab")]])
    assert (f[:, 6] > f[:, 7]).all() and (f[:, 7] > 0.5).all()  # as planted: 6 the more active, 7 firing
    assert a["main_feature"] == 0 and a["n_absorbed"] == a["n_misses"] > 0
    assert a["absorbing_features"] == [{"feature": 7, "n_absorbed": a["n_absorbed"]}]


def test_absorbing_features_are_counted_most_first_and_capped():
    from train.evaluation.absorption import ABSORBERS_LISTED, absorbing_features

    got = absorbing_features(torch.tensor([5, 3, 5, 9, 3, 5, 1]))
    assert got == [{"feature": 5, "n_absorbed": 3}, {"feature": 3, "n_absorbed": 2},
                   {"feature": 1, "n_absorbed": 1}, {"feature": 9, "n_absorbed": 1}]
    many = absorbing_features(torch.arange(3 * ABSORBERS_LISTED).repeat_interleave(2)[2:])
    assert len(many) == ABSORBERS_LISTED and many[0] == {"feature": 1, "n_absorbed": 2}
    assert absorbing_features(torch.zeros(0, dtype=torch.long)) == []


def test_no_split_no_absorption():
    words = planted_words()
    got = absorption_metrics(words, planted_acts(words), planted_sae(split=False))
    assert got["absorption_first_letter_rate"] == 0.0
    assert got["absorption_first_letter_rate_of_misses"] is None  # the main features miss nothing
    assert all(v["absorbing_features"] == [] for v in got["absorption_first_letter_per_letter"].values())
    assert got["absorption_first_letter_f1"] == pytest.approx(1.0)
    assert got["absorption_first_letter_probe_accuracy"] > 0.97


def test_a_miss_with_nothing_else_firing_is_not_absorbed():
    """The split SAE with feature 6 silenced: the 'ab' words are missed, and nothing takes them."""
    words = planted_words()
    sae = planted_sae(split=True)
    with torch.no_grad():
        sae.b_enc[6] = -10.0
    a = absorption_metrics(words, planted_acts(words), sae)["absorption_first_letter_per_letter"]["a"]
    assert a["n_misses"] > 0 and a["n_absorbed"] == 0 and a["rate"] == 0.0
    assert a["absorbing_features"] == []


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int], special: list[int]) -> None:
        self.vocab, self.all_special_ids = vocab, special

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_first_letter_tokens_strip_markers_and_keep_one_per_word():
    tok = FakeTokenizer({"<|endoftext|>": 0, "cat": 1, "Ġcat": 2, "▁Dog": 3, "Ġ12": 4, "é": 5, "x-y": 6,
                         "ran": 7, "end": 8}, special=[0])
    ids, words = first_letter_tokens(tok)
    assert list(zip(ids, words)) == [(2, "cat"), (3, "Dog"), (7, "ran"), (8, "end")]
    with pytest.raises(UserError, match="at least 2 first letters"):
        letters_kept(words)  # every letter has a single word
    assert letters_kept(["cat", "Cow", "dog", "dig", "e"]) == ["c", "d"]


def test_bad_inputs_are_user_errors():
    words = planted_words()
    with pytest.raises(UserError, match="one activation row per word"):
        absorption_metrics(words, torch.zeros(3, D), planted_sae(True))
    with pytest.raises(UserError, match="width"):
        absorption_metrics(words, torch.zeros(len(words), D + 1), planted_sae(True))


# ---- the CLI, end to end on the tiny model -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, vocab_size) -> tuple[Path, Path]:
    """(model folder, run folder): the tiny model copied (its tokenizer is replaced by a test),
    harvested and an SAE trained on it."""
    from click.testing import CliRunner

    from harvest.cli import main as harvest_main
    from train.cli import main as train_main

    root = tmp_path_factory.mktemp("absorption")
    model = Path(shutil.copytree(tiny_model, root / "model"))
    ds = write_token_dataset(root / "ds", n_docs=20, doc_len=100, vocab=vocab_size)
    runner = CliRunner()
    got = runner.invoke(harvest_main, ["--quiet", "--model", str(model), "--dataset", str(ds), "--out",
                                       str(root / "dump"), "--hook", "blocks.0.hook_resid_post", "--context-size",
                                       "32", "--batch-size", "5", "--tokens", "1500", "--device", "cpu"])
    assert got.exit_code == 0, got.output
    got = runner.invoke(train_main, ["--shards", str(root / "dump"), "--checkpoint-path", str(root / "run"),
                                     "--device", "cpu", "--expansion-factor", "2", "--train-batch-size", "128",
                                     "--eval-holdout-contexts", "8", "--quiet"])
    assert got.exit_code == 0, got.output
    return model, root / "run"


def test_cli_absorption_writes_eval_json(tiny_run):
    from click.testing import CliRunner

    from train.evaluation.cli import main as evaluate_main

    _, run = tiny_run
    got = CliRunner().invoke(evaluate_main, [str(run), "--absorption", "--max-eval-contexts", "2",
                                             "--batch-contexts", "2", "--device", "cpu"])
    assert got.exit_code == 0, got.output
    assert "absorption: token activations" in got.output and "absorption_first_letter_rate" in got.output
    ev = json.loads((run / "eval.json").read_text())
    for key in ABSORPTION_KEYS:
        assert key in ev, key
    for key in ("absorption_first_letter_rate", "absorption_first_letter_f1", "absorption_first_letter_probe_f1",
                "absorption_first_letter_probe_accuracy"):
        assert isinstance(ev[key], float) and 0.0 <= ev[key] <= 1.0, key
    misses = ev["absorption_first_letter_rate_of_misses"]
    assert misses is None or 0 <= misses <= 1
    assert ev["absorption_first_letter_n_letters"] >= 2 and isinstance(ev["absorption_first_letter_n_tokens"], int)
    per = ev["absorption_first_letter_per_letter"]
    assert set(per) <= set("abcdefghijklmnopqrstuvwxyz") and len(per) == ev["absorption_first_letter_n_letters"]
    assert all(isinstance(v["main_feature"], int) for v in per.values())
    doc = (Path(__file__).parents[1] / "docs" / "evaluate.md").read_text()  # each key has its line there
    table = doc[doc.index("### What each key of eval.json means"):]
    table = table[:table.index("\n\n", table.index("| key |"))]
    assert not [k for k in ev if k.startswith("absorption") and f"`{k}`" not in table]
    for args, needle in ((["--no-model"], "drop --no-model"), (["--no-metrics", "--dashboard"], "drop --no-metrics")):
        bad = CliRunner().invoke(evaluate_main, [str(run), "--absorption", *args])
        assert bad.exit_code != 0 and needle in bad.output and "Traceback" not in bad.output, bad.output


def test_cli_absorption_with_dashboard_shows_it(tiny_run):
    """`--absorption --dashboard` in one command: the dashboard shows the absorption just measured."""
    from click.testing import CliRunner

    from test_dashboard import js_payload
    from train.evaluation.cli import main as evaluate_main

    _, run = tiny_run
    got = CliRunner().invoke(evaluate_main, [str(run), "--absorption", "--dashboard", "--max-eval-contexts", "2",
                                             "--batch-contexts", "2", "--device", "cpu", "--quiet"])
    assert got.exit_code == 0, got.output
    per = json.loads((run / "eval.json").read_text())["absorption_first_letter_per_letter"]
    shown = js_payload(run / "dashboard" / "data" / "meta.js")["absorption"]
    assert [r["letter"] for r in shown] == sorted(per)
    assert [r["main_feature"] for r in shown] == [per[c]["main_feature"] for c in sorted(per)]
    assert [r["absorbing_features"] for r in shown] == [per[c]["absorbing_features"] for c in sorted(per)]


def test_cli_absorption_too_few_word_tokens_is_one_line(tiny_run, vocab_size):
    """The model's tokenizer replaced by one with no alphabetic entries: a one-line error."""
    from click.testing import CliRunner
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from train.evaluation.cli import main as evaluate_main

    model, run = tiny_run
    saved = {p.name: p.read_bytes() for p in model.iterdir() if "token" in p.name or p.name.endswith(".txt")}
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"{i}x": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(model)
    try:
        got = CliRunner().invoke(evaluate_main, [str(run), "--absorption", "--max-eval-contexts", "2",
                                                 "--batch-contexts", "2", "--device", "cpu", "--quiet"])
    finally:
        for name, data in saved.items():
            (model / name).write_bytes(data)
    assert got.exit_code != 0 and "Traceback" not in got.output, got.output
    lines = [line for line in got.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "at least 2 first letters" in lines[0], got.output


def test_sweep_summary_has_absorption_columns_and_plot(tmp_path):
    """eval.json's scalar absorption figures become summary columns (the per-letter dict does not),
    and the L0-absorption frontier is drawn from them."""
    import csv

    from train import run_layout
    from train.run_layout import SweepEntry
    from train.summary import write_summary

    entries = []
    for i, (l0, rate) in enumerate(((5.0, 0.1), (20.0, 0.05))):
        run = tmp_path / f"r{i}"
        run.mkdir()
        run_layout.write_eval(run, {"l0": l0, "absorption_first_letter_rate": rate, "absorption_first_letter_f1": 0.5,
                                    "absorption_first_letter_rate_of_misses": None,
                                    "absorption_first_letter_per_letter": {"a": {"rate": rate}}})
        entries.append(SweepEntry(f"r{i}", run, {"k": i}))
    write_summary(tmp_path / "sw", entries, ["k"], log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "sw" / run_layout.SUMMARY_CSV)))
    assert [float(r["absorption_first_letter_rate"]) for r in rows] == [0.1, 0.05]
    assert "absorption_first_letter_per_letter" not in rows[0]
    drawn = json.loads((tmp_path / "sw" / run_layout.PLOTS_INDEX).read_text())
    assert sorted(drawn[run_layout.FRONTIER_ABSORPTION]) == ["r0", "r1"]
    assert (tmp_path / "sw" / run_layout.FRONTIER_ABSORPTION).stat().st_size > 5000


def test_a_split_over_several_weak_features_is_not_absorbed():
    """Feature 6's part of the 'ab' words shared by three features, each writing a third along
    d_a: no one of them writes half of the token's projection, so nothing is absorbed."""
    q = directions()
    sae = SparseAutoencoder(SAEConfig(D, 10))
    split = planted_sae(split=True)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([split.W_enc[:, :6], torch.zeros(D, 4)], dim=1))
        sae.W_dec.zero_()
        sae.W_dec[:6] = split.W_dec[:6]
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.2)
        for k in (6, 7, 8):  # each fires ~1.2 on 'ab' words, writes 1.2 * (d_a / 3 + e / 3) there
            sae.W_enc[:, k] = 1.4 * q[:, 6]
            sae.W_dec[k] = (q[:, 0] + q[:, 6]) / 3
        sae.b_enc[9] = -1.0
    words = planted_words()
    a = absorption_metrics(words, planted_acts(words), sae)["absorption_first_letter_per_letter"]["a"]
    assert a["main_feature"] == 0 and a["n_misses"] > 0 and a["n_absorbed"] == 0


@pytest.mark.parametrize("cfg, why", [({"architecture": "standard_transcoder", "d_in": 4, "d_sae": 8}, "transcoder"),
                                      ({"architecture": "standard", "n_hooks": 2, "d_in": 4, "d_sae": 8}, "several hooks")])
def test_transcoders_and_stacked_saes_are_not_measured(tmp_path, cfg, why):
    from train.evaluation.absorption import absorption_of_folder

    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    got = absorption_of_folder(tmp_path, None, None, None, "cpu")
    assert list(got) == ["absorption_not_measured"] and why in got["absorption_not_measured"]


def test_a_sweep_runs_the_token_activations_once_and_scores_as_alone(tiny_run, tmp_path, monkeypatch):
    """The words' activations depend only on the model and the hook: evaluating a sweep computes them
    once for all its SAEs, and each SAE scores what it scores evaluated alone."""
    from click.testing import CliRunner

    from train.cli import main as train_main
    from train.evaluation import absorption
    from train.evaluation.cli import main as evaluate_main

    _, run = tiny_run
    got = CliRunner().invoke(train_main, ["--shards", str(run.parent / "dump"), "--checkpoint-path", str(tmp_path / "sw"),
                                          "--device", "cpu", "--expansion-factor", "2", "--train-batch-size", "128",
                                          "--eval-holdout-contexts", "8", "--quiet", "--sweep", "l1_coefficient=1,3"])
    assert got.exit_code == 0, got.output
    calls = []
    real = absorption.token_activations
    monkeypatch.setattr(absorption, "token_activations", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    args = ["--absorption", "--no-verify", "--max-eval-contexts", "2", "--batch-contexts", "2", "--device", "cpu"]
    got = CliRunner().invoke(evaluate_main, [str(tmp_path / "sw"), *args])
    assert got.exit_code == 0, got.output
    assert calls == ["blocks.0.hook_resid_post"]
    runs = sorted(p for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert len(runs) == 2
    together = [json.loads((r / "eval.json").read_text()) for r in runs]
    for r, ev in zip(runs, together):
        got = CliRunner().invoke(evaluate_main, [str(r), *args])
        assert got.exit_code == 0, got.output
        alone = json.loads((r / "eval.json").read_text())
        for key in ABSORPTION_KEYS:
            assert alone[key] == ev[key], (r.name, key)
    assert len(calls) == 3  # once for the sweep, once for each SAE alone
