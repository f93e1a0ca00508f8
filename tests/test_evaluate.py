"""Evaluation: every metric equals an independent computation written here, on tiny dumps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_token_dataset
from helpers import run_harvest
from shared.dump_writer import write_dump
from shared.errors import UserError
from shared.reader import open_dump
from shared.sae import SAEConfig, SparseAutoencoder
from train.evaluation.downstream import ce_metrics
from train.evaluation.examples import format_example, load_tokenizer, top_examples
from train.evaluation.reconstruction import reconstruction_metrics
from train.evaluation.run_eval import EvalConfig, evaluate_checkpoint
from train.evaluation.tokens import context_tokens

pytestmark = pytest.mark.usefixtures("one_thread_module")

HOOK = "blocks.0.hook_mlp_out"
CONTEXT, N_CONTEXTS, DOC_LEN = 32, 32, 100  # harvest: ceil(1000 / 32) = 32 contexts of 32 tokens


@pytest.fixture(scope="module")
def docs(tmp_path_factory, vocab_size) -> tuple[Path, list[list[int]]]:
    """A token dataset and its documents, for rebuilding contexts independently of harvest."""
    import datasets

    folder = write_token_dataset(tmp_path_factory.mktemp("eval_ds") / "ds", n_docs=40, doc_len=DOC_LEN,
                                 vocab=vocab_size)
    return folder, list(datasets.load_from_disk(str(folder))["tokens"])


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny GPT-2 trained for a second on `rule_tokens`, where MLP 0 carries the prediction.

    Why train: on a random-weight model every ablation changes the loss by noise, so "loss
    recovered" has no sign to test. Trained, zero-ablating MLP 0 raises the loss ~10x.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(str(tiny_model))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(50):
        toks = rule_tokens(16, g, model.config.vocab_size)
        loss = model(toks, labels=toks).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("trained_model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(folder)
    return folder


def rule_tokens(n: int, g: torch.Generator, vocab: int) -> torch.Tensor:
    """[n, CONTEXT] contexts: BOS, a random token, then each token a fixed function of the last."""
    seq = [torch.zeros(n, 1, dtype=torch.long), torch.randint(1, vocab, (n, 1), generator=g)]
    for _ in range(CONTEXT - 2):
        seq.append((seq[-1] * 5 + 3) % (vocab - 1) + 1)
    return torch.cat(seq, dim=1)


@pytest.fixture(scope="module", params=[False, True], ids=["keep_bos", "skip_bos"])
def dump_path(request, model_dir, docs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_dump") / "dump"
    run_harvest("--model", str(model_dir), "--dataset", str(docs[0]), "--out", str(out), "--hook", HOOK,
                "--context-size", str(CONTEXT), "--batch-size", "4", "--tokens", "1000",
                "--shard-rows", "300", "--skip-bos" if request.param else "--keep-bos")
    return out


@pytest.fixture(scope="module")
def bridge(model_dir):
    from shared.models import load_model

    return load_model(str(model_dir), "cpu")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    """The same weights as plain Hugging Face GPT-2, for computing CE without TransformerLens."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def ce_tokens(vocab_size) -> torch.Tensor:
    return rule_tokens(5, torch.Generator().manual_seed(1), vocab_size)


def identity_sae(d_in: int, gain: float = 1.0) -> SparseAutoencoder:
    """x_hat == gain * x exactly: features [ReLU(x), ReLU(-x)], decoded as ReLU(x) - ReLU(-x)."""
    sae = SparseAutoencoder(SAEConfig(d_in, 2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(gain * torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d_in: int, d_sae: int, seed: int = 0) -> SparseAutoencoder:
    """Encoder drawn apart from the decoder: a tied random SAE (W_enc = W_dec^T) is close to a
    scaled identity, and would reconstruct well."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in, d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.b_enc.uniform_(-0.02, 0.05)
        sae.b_dec.normal_(0, 0.01)
    return sae


def packed_grid(docs: list[list[int]], n: int) -> torch.Tensor:
    """What harvest feeds the model: documents concatenated in order, 31-token pieces after BOS 0."""
    stream = [t for d in docs for t in d]
    body = CONTEXT - 1
    return torch.tensor([[0] + stream[i * body : (i + 1) * body] for i in range(n)])


# ----------------------------------------------------------------------------- context_tokens


def test_context_tokens_rebuild_what_harvest_fed_the_model(dump_path, docs, bridge):
    dump = open_dump(dump_path)
    expected = packed_grid(docs[1], N_CONTEXTS)
    assert torch.equal(context_tokens(dump, 0, N_CONTEXTS), expected)
    got = context_tokens(dump, 9, 10)  # crosses the 300-row shard boundaries
    assert got.dtype == torch.int64 and torch.equal(got, expected[9:19])
    # The rebuilt contexts reproduce the stored activations through the model.
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(got, names_filter=[HOOK])
    acts = cache[HOOK][:, 1:] if dump.manifest.skip_bos else cache[HOOK]
    rpc = dump.manifest.rows_per_context
    torch.testing.assert_close(acts.reshape(-1, dump.d_in), dump.activations(9 * rpc, 19 * rpc),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="outside the dump's 32 contexts"):
        context_tokens(dump, 30, 5)


# ----------------------------------------------------------------------------- reconstruction


def test_reconstruction_metrics_match_formulas(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(60, 8) * torch.linspace(0.5, 2, 8) + 3.0  # an offset mean the variance must remove
    write_dump(tmp_path / "d", x, context_size=10, shard_rows=25)
    dump = open_dump(tmp_path / "d")
    sae = random_sae(8, 24)
    with torch.no_grad():
        sae.b_enc[:3] = -1e3  # never fire
        sae.b_enc[3:6] = 1e3  # always fire
    got = reconstruction_metrics(sae, dump, (13, 57), "cpu", chunk_rows=7)

    xs = x[13:57].double()
    with torch.no_grad():
        out = sae(x[13:57])
    err = (xs - out.sae_out.double()).pow(2).sum(1)
    fires = (out.feature_acts > 0).double()  # [rows, d_sae]
    assert got["n_rows"] == 44
    assert got["mse"] == pytest.approx(float(err.mean()), rel=1e-6)
    ev = 1 - float(err.sum() / (xs - xs.mean(0)).pow(2).sum())
    assert got["explained_variance"] == pytest.approx(ev, rel=1e-6)
    assert got["l0"] == pytest.approx(float(fires.sum(1).mean()))
    assert got["frac_dead"] == pytest.approx(float((fires.sum(0) == 0).double().mean()))
    assert got["frac_dead"] >= 3 / 24
    assert got["frac_dense"] == pytest.approx(float((fires.mean(0) > 0.1).double().mean()))
    assert got["frac_dense"] >= 3 / 24
    torch.testing.assert_close(got.pop("density"), fires.mean(0).float())
    json.dumps(got)


def test_exact_reconstruction_explains_all_variance(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(40, 6) + 100.0  # large mean: a one-pass sum of squares would cancel badly
    write_dump(tmp_path / "d", x, context_size=8, shard_rows=16)
    got = reconstruction_metrics(identity_sae(6), open_dump(tmp_path / "d"), (0, 40), "cpu", chunk_rows=9)
    assert got["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert got["mse"] == pytest.approx(0.0, abs=1e-9)
    assert got["l0"] == 6  # every x > 0: exactly the ReLU(x) half fires
    assert got["frac_dead"] == 0.5
    with pytest.raises(UserError, match="empty or outside"):
        reconstruction_metrics(identity_sae(6), open_dump(tmp_path / "d"), (40, 40), "cpu")


# ----------------------------------------------------------------------------- cross-entropy


def _hf_losses(hf_model, tokens: torch.Tensor, replace, skip_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE, log-probs [n, T-1, vocab]) in float64 with GPT-2's MLP 0 output replaced by
    `replace(output)` (None: clean), through a plain torch forward hook."""
    def hook(module, inputs, output):
        new = replace(output)
        if skip_bos:
            new = new.clone()
            new[:, 0] = output[:, 0]
        return new

    handle = hf_model.transformer.h[0].mlp.register_forward_hook(hook) if replace else None
    try:
        with torch.no_grad():
            logits = hf_model(tokens).logits.double()
    finally:
        if handle:
            handle.remove()
    logp = torch.log_softmax(logits[:, :-1], -1)
    ce = torch.nn.functional.nll_loss(logp.reshape(-1, logp.shape[-1]), tokens[:, 1:].reshape(-1))
    return ce, logp


@pytest.mark.parametrize("skip_bos", [False, True])
def test_ce_metrics_match_a_plain_hf_computation(bridge, hf_model, ce_tokens, skip_bos):
    d_in = bridge.cfg.d_model
    sae = random_sae(d_in, 64)
    mean = torch.randn(d_in) * 0.1
    got = ce_metrics(bridge, sae, HOOK, ce_tokens, mean, skip_bos, batch_size=3, device="cpu")

    clean, logp_clean = _hf_losses(hf_model, ce_tokens, None, skip_bos)
    with_sae, logp_sae = _hf_losses(hf_model, ce_tokens, lambda o: sae(o).sae_out, skip_bos)
    zero, _ = _hf_losses(hf_model, ce_tokens, torch.zeros_like, skip_bos)
    ablated, _ = _hf_losses(hf_model, ce_tokens, lambda o: mean.expand_as(o), skip_bos)
    kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1).mean()
    assert got["ce_clean"] == pytest.approx(float(clean), rel=1e-5)
    assert got["ce_with_sae"] == pytest.approx(float(with_sae), rel=1e-5)
    assert got["ce_zero_ablation"] == pytest.approx(float(zero), rel=1e-5)
    assert got["ce_mean_ablation"] == pytest.approx(float(ablated), rel=1e-5)
    assert got["kl_clean_sae"] == pytest.approx(float(kl), rel=1e-4)
    assert got["ce_loss_recovered"] == pytest.approx(float((zero - with_sae) / (zero - clean)), rel=1e-4)
    assert got["ce_loss_recovered_mean_ablation"] == pytest.approx(
        float((ablated - with_sae) / (ablated - clean)), rel=1e-4)
    assert got["ce_zero_ablation"] > 2 * got["ce_clean"]  # the hook matters to this model
    assert got["ce_loss_recovered"] < 0.9  # a random SAE destroys most of what the hook carries


def test_ce_loss_recovered_of_good_saes(bridge, ce_tokens):
    d_in = bridge.cfg.d_model
    exact = ce_metrics(bridge, identity_sae(d_in), HOOK, ce_tokens, torch.zeros(d_in), False, 2, "cpu")
    assert exact["ce_with_sae"] == pytest.approx(exact["ce_clean"], rel=1e-6)
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact["kl_clean_sae"] == pytest.approx(0.0, abs=1e-6)
    # Shrinking the reconstruction loses some, not all, of what zero-ablation loses.
    shrunk = ce_metrics(bridge, identity_sae(d_in, gain=0.7), HOOK, ce_tokens, torch.zeros(d_in), False, 2,
                        "cpu")
    assert exact["ce_clean"] < shrunk["ce_with_sae"] < shrunk["ce_zero_ablation"]
    assert 0 < shrunk["ce_loss_recovered"] < 1 and shrunk["kl_clean_sae"] > 0


# ----------------------------------------------------------------------------- a checkpoint


def _checkpoint(folder: Path, sae: SparseAutoencoder, dump: Path, model: Path, **extra) -> Path:
    cfg = {"shards": str(dump), "model_name": str(model), "hook_name": HOOK, **extra}
    return sae.save(folder, cfg)


def test_evaluate_checkpoint_on_heldout_contexts(bridge, dump_path, model_dir, tmp_path):
    dump = open_dump(dump_path)
    folder = _checkpoint(tmp_path / "sae", identity_sae(dump.d_in), dump_path, model_dir,
                         eval_holdout_contexts=4)
    got = evaluate_checkpoint(folder, EvalConfig(device="cpu", max_eval_contexts=3, batch_contexts=3),
                              model=bridge)
    json.dumps(got)
    rpc = dump.manifest.rows_per_context
    assert got["n_eval_contexts"] == 4 and got["n_rows"] == 4 * rpc and got["n_ce_contexts"] == 3
    assert got["sae"] == str(folder) and got["hook"] == HOOK
    assert got["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert got["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    # The reconstruction part is exactly the last 4 contexts' rows; the CE part their first 3.
    sae = random_sae(dump.d_in, 64)
    folder = _checkpoint(tmp_path / "random", sae, dump_path, model_dir, eval_holdout_contexts=4)
    got = evaluate_checkpoint(folder, EvalConfig(device="cpu", max_eval_contexts=3), model=bridge)
    want = reconstruction_metrics(sae, dump, (dump.n_rows - 4 * rpc, dump.n_rows), "cpu")
    assert got["mse"] == pytest.approx(want["mse"], rel=1e-6) and got["l0"] == want["l0"]
    tokens = context_tokens(dump, N_CONTEXTS - 4, 3)
    mean = torch.tensor(dump.manifest.stats["mean"])
    want_ce = ce_metrics(bridge, sae, HOOK, tokens, mean, dump.manifest.skip_bos, 8, "cpu")
    assert got["ce_with_sae"] == pytest.approx(want_ce["ce_with_sae"], rel=1e-6)


def test_evaluate_checkpoint_loads_the_dumps_model_and_needs_a_holdout(dump_path, model_dir, tmp_path):
    dump = open_dump(dump_path)
    folder = _checkpoint(tmp_path / "sae", identity_sae(dump.d_in), Path("/nonexistent"), model_dir,
                         eval_holdout_contexts=0)
    with pytest.raises(UserError, match="--holdout-contexts"):
        evaluate_checkpoint(folder, EvalConfig(device="cpu"), dump_path=str(dump_path))
    got = evaluate_checkpoint(folder, EvalConfig(holdout_contexts=2, device="cpu"), dump_path=str(dump_path))
    assert got["n_eval_contexts"] == 2 and got["n_ce_contexts"] == 2
    assert got["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    only = evaluate_checkpoint(folder, EvalConfig(holdout_contexts=2, with_model=False),
                               dump_path=str(dump_path))
    assert "ce_clean" not in only and only["mse"] == got["mse"]
    # A cfg.json without eval_holdout_contexts gets the training default: 1% of 32, at least 1.
    folder = _checkpoint(tmp_path / "old", identity_sae(dump.d_in), dump_path, model_dir)
    assert evaluate_checkpoint(folder, EvalConfig(with_model=False))["n_eval_contexts"] == 1


# ----------------------------------------------------------------------------- feature examples


def test_top_examples_are_the_true_top_rows(dump_path):
    dump = open_dump(dump_path)
    sae = random_sae(dump.d_in, 48, seed=3)
    features, n = [0, 7, 31], 6
    x = dump.activations(0, dump.n_rows)
    with torch.no_grad():
        acts = sae.encode(x)  # [rows, d_sae]
    for rows in (None, (100, 700)):
        got = top_examples(sae, dump, features, n, rows=rows, chunk_rows=64)
        lo, hi = rows or (0, dump.n_rows)
        for f in features:
            order = torch.argsort(acts[lo:hi, f], descending=True)[:n] + lo
            expected = [int(r) for r in order if acts[r, f] > 0]
            assert expected, "the random SAE should fire"
            got_rows = [e["row"] for e in got[f]]
            # BOS rows (keep_bos) share one activation: ties may come in any order.
            assert [e["activation"] for e in got[f]] == pytest.approx([float(acts[r, f]) for r in expected])
            assert len(set(got_rows)) == len(got_rows) and all(lo <= r < hi for r in got_rows)
            if len(set(acts[expected, f].tolist())) == len(expected):
                assert got_rows == expected
            for e in got[f]:
                row = e["row"]
                assert e["activation"] == pytest.approx(float(acts[row, f]), rel=1e-5)
                assert e["context"] == int(dump.column("context", row, row + 1)[0])
                assert e["position"] == e["ids_marked"] == int(dump.column("position", row, row + 1)[0])
                assert e["tokens"] == context_tokens(dump, e["context"], 1)[0].tolist()
                assert e["tokens"][e["ids_marked"]] == int(dump.column("tokens", row, row + 1)[0])


def test_top_examples_skip_rows_where_a_feature_does_not_fire(tmp_path):
    x = torch.zeros(20, 4)
    x[[3, 11, 12], 0] = torch.tensor([1.0, 3.0, 2.0])
    write_dump(tmp_path / "d", x, context_size=5, shard_rows=8)
    got = top_examples(identity_sae(4), open_dump(tmp_path / "d"), [0, 1], n=5, chunk_rows=3)
    assert [e["row"] for e in got[0]] == [11, 12, 3] and got[1] == []
    assert [e["activation"] for e in got[0]] == [3.0, 2.0, 1.0]
    with pytest.raises(UserError, match="features"):
        top_examples(identity_sae(4), open_dump(tmp_path / "d"), [8], n=5)


def test_format_example_marks_the_firing_token(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    assert tok is not None
    ids = tok("the cat sat on the mat and ran fast", add_special_tokens=False)["input_ids"]
    example = {"tokens": [0, *ids], "ids_marked": 3}
    assert format_example(example, tok, window=1) == "cat[[sat]]on"
    assert format_example(example, tok, window=100).startswith("<|endoftext|>thecat[[sat]]")
    assert format_example(example, None, window=1) == f"{ids[1]} [[{ids[2]}]] {ids[3]}"
    assert format_example({"tokens": [5, 6], "ids_marked": 0}, None) == "[[5]] 6"
    assert load_tokenizer("no-such-org/no-such-model-xyz") is None


def test_shared_ablation_baselines_give_the_same_metrics(bridge, ce_tokens):
    """A sweep evaluates its SAEs with the ablation runs cached from the first: same numbers."""
    d_in = bridge.cfg.d_model
    mean = torch.randn(d_in) * 0.1
    saes = [random_sae(d_in, 64, seed=s) for s in (0, 1)]
    alone = [ce_metrics(bridge, sae, HOOK, ce_tokens, mean, False, 3, "cpu") for sae in saes]
    cache: dict = {}
    shared = [ce_metrics(bridge, sae, HOOK, ce_tokens, mean, False, 3, "cpu", baselines=cache) for sae in saes]
    assert cache  # the first SAE filled it
    for a, b in zip(alone, shared):
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_evaluate_cli_bad_feature_list(tmp_path):
    from click.testing import CliRunner

    from train.evaluation.cli import main as evaluate_main

    (tmp_path / "cfg.json").write_text("{}")
    for args, needle in ((["--top-examples", "2", "--features", "a,b"], "comma-separated integers"),
                         (["--top-examples", "-1"], "must be positive")):
        got = CliRunner().invoke(evaluate_main, [str(tmp_path), *args])
        assert got.exit_code == 2 and needle in got.output and "Traceback" not in got.output, got.output


def test_ce_metrics_bar_counts_contexts_and_changes_nothing(bridge, ce_tokens, capsys):
    d_in = bridge.cfg.d_model
    quiet = ce_metrics(bridge, identity_sae(d_in), HOOK, ce_tokens, torch.zeros(d_in), False, 3, "cpu")
    assert capsys.readouterr().err == ""
    shown = ce_metrics(bridge, identity_sae(d_in), HOOK, ce_tokens, torch.zeros(d_in), False, 3, "cpu",
                       progress=True)
    err = capsys.readouterr().err
    runs = 4 * -(-ce_tokens.shape[0] // 3)  # clean, SAE, zero and mean ablation per batch of 3
    assert "CE with the SAE spliced in: 100%" in err and f"{runs}/{runs}" in err
    assert shown == quiet
    # A second SAE on the same contexts skips the ablation runs; the bar still ends at the total.
    cache: dict = {}
    for _ in range(2):
        ce_metrics(bridge, identity_sae(d_in), HOOK, ce_tokens, torch.zeros(d_in), False, 3, "cpu",
                   baselines=cache, progress=True)
        assert f"{runs}/{runs}" in capsys.readouterr().err
