"""`evaluate` on transcoders: the reconstruction metrics are against the target dump's held-out rows
(raw target units), the model runs with the target hook's activation replaced by the transcoder's
output on the input hook's (equal to a forward spliced by hand in plain Hugging Face GPT-2), an
exact transcoder recovers all of the loss, a missing, moved or foreign target dump is refused in
one line, and the dashboard builds (its logit table only where the transcoder writes d_model)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import NARROW, SAME_WIDTH, WIDE, harvest_pass, hooked_ce
from shared.reader import open_dump
from shared.saes import SAEConfig, architecture_class, load_sae
from train.evaluation.cli import main as evaluate_main
from train.evaluation.downstream import ce_metrics

pytestmark = pytest.mark.usefixtures("one_thread_module")

CONTEXT, HOLDOUT = 32, 4
"""Harvest's context size; contexts the runs hold out (and evaluate on)."""


def rule_tokens(n: int, length: int, g: torch.Generator, vocab: int) -> torch.Tensor:
    """[n, length]: BOS, a random token, then each token a fixed function of the last one."""
    seq = [torch.zeros(n, 1, dtype=torch.long), torch.randint(1, vocab, (n, 1), generator=g)]
    for _ in range(length - 2):
        seq.append((seq[-1] * 5 + 3) % (vocab - 1) + 1)
    return torch.cat(seq, dim=1)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny GPT-2 trained briefly on `rule_tokens`: its MLP 0 then carries the prediction, so
    ablating that MLP's output costs loss and "loss recovered" means something."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(str(tiny_model))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(50):
        toks = rule_tokens(16, CONTEXT, g, model.config.vocab_size)
        loss = model(toks, labels=toks).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("trained_model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(model_dir, tmp_path_factory) -> Path:
    """Documents following the rule the model learnt (without their BOS: harvest adds it)."""
    import datasets
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
    docs = rule_tokens(60, 101, torch.Generator().manual_seed(5), vocab)[:, 1:]
    folder = tmp_path_factory.mktemp("rule_ds") / "ds"
    datasets.Dataset.from_dict({"tokens": docs.tolist()}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def dumps(model_dir, dataset, tmp_path_factory) -> dict[str, Path]:
    """One harvest pass (BOS skipped): the MLP's hidden activations (128 wide), its output (32) and
    the residual after the block (32, another hook of the output's width)."""
    folders = harvest_pass(model_dir, dataset, tmp_path_factory.mktemp("pass"), hooks=(WIDE, NARROW, SAME_WIDTH),
                           tokens=4000)
    return dict(zip(("hidden", "out", "resid"), folders))


@pytest.fixture(scope="module")
def bridge(model_dir):
    from shared.models import load_model

    return load_model(str(model_dir), "cpu")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()


def train_cli(*args: str) -> None:
    from train.cli import main

    got = CliRunner().invoke(main, [*args, "--quiet", "--device", "cpu", "--train-batch-size", "128",
                                    "--d-sae", "64", "--eval-holdout-contexts", str(HOLDOUT),
                                    "--normalize-activations", "expected_norm", "--lr", "0.01"])
    assert got.exit_code == 0, got.output


@pytest.fixture(scope="module")
def trained(dumps, tmp_path_factory) -> Path:
    """A TopK skip transcoder MLP hidden -> MLP out trained from the command line, evaluated at the
    end of training (eval.json)."""
    run = tmp_path_factory.mktemp("tc") / "run"
    train_cli("--shards", str(dumps["hidden"]), "--target-shards", str(dumps["out"]), "--skip-connection",
              "--architecture", "topk", "--k", "8", "--total-training-tokens", str(128 * 24),
              "--checkpoint-path", str(run), "--evaluate-at-end")
    return run


def evaluate(*args: str) -> tuple[int, str]:
    got = CliRunner().invoke(evaluate_main, [*map(str, args), "--quiet", "--device", "cpu"])
    return got.exit_code, got.output


def exact_transcoder(hf_model, d_sae: int = 16):
    """A skip transcoder computing MLP 0's output from its hidden activations exactly: W_skip is
    c_proj's weight (GPT-2's Conv1D computes h @ W + b), b_dec its bias, the decoder zero."""
    proj = hf_model.transformer.h[0].mlp.c_proj
    cls = architecture_class("standard")
    sae = cls(SAEConfig(128, d_sae, 32, apply_b_dec_to_input=False), cls.Settings(skip_connection=True))
    with torch.no_grad():
        sae.W_skip.copy_(proj.weight.T)
        sae.b_dec.copy_(proj.bias)
        sae.W_dec.zero_()
    return sae


def save_transcoder(sae, folder: Path, dumps: dict[str, Path], model_dir: Path, read: str = "hidden",
                    write: str = "out", **extra) -> Path:
    """A transcoder saved as `train` saves one: its input dump in `shards`, its target in `target`."""
    target = open_dump(dumps[write])
    cfg = {"shards": str(dumps[read]), "model_name": str(model_dir), "hook_name": open_dump(dumps[read]).manifest.hook,
           "eval_holdout_contexts": HOLDOUT,
           "target": {"shards": str(dumps[write]), "hook_point": target.manifest.hook, "d_out_dump": target.d_in}}
    return sae.save(folder / "final", {**cfg, **extra})


def heldout(dump_path: Path) -> torch.Tensor:
    """The rows of the last HOLDOUT contexts, float64."""
    dump = open_dump(dump_path)
    return dump.activations(dump.n_rows - HOLDOUT * dump.manifest.rows_per_context, dump.n_rows).double()


# ----------------------------------------------------------------------------- held-out metrics


def test_metrics_are_against_the_target_dumps_heldout_rows(trained, dumps):
    at_end = json.loads((trained / "eval.json").read_text())
    code, out = evaluate(trained)
    assert code == 0, out
    got = json.loads((trained / "eval.json").read_text())
    assert got["hook"] == WIDE and got["target_hook"] == NARROW
    assert got["target_dump"] == str(dumps["out"]) and got["units"] == "raw activations"
    assert NARROW in got["target_units"] and "raw" in got["target_units"]
    # Written by hand: the transcoder on the input's held-out rows, against the target's same rows.
    sae = load_sae(trained / "final")
    x, t = heldout(dumps["hidden"]), heldout(dumps["out"])
    with torch.no_grad():
        out_rows = sae(x.float())
    t_hat = out_rows.sae_out.double()
    sse = float((t - t_hat).pow(2).sum())
    assert got["n_rows"] == len(t) == HOLDOUT * (CONTEXT - 1)
    assert got["explained_variance"] == pytest.approx(1 - sse / float((t - t.mean(0)).pow(2).sum()), rel=1e-6)
    assert got["mse"] == pytest.approx(sse / len(t), rel=1e-6)
    assert got["l0"] == pytest.approx(float((out_rows.feature_acts > 0).sum(1).double().mean()))
    assert got["l2_norm_ratio"] == pytest.approx(float((t_hat.norm(dim=1) / t.norm(dim=1)).mean()), rel=1e-6)
    assert got["relative_reconstruction_bias"] == pytest.approx(
        float(t_hat.pow(2).sum() / (t_hat * t).sum()), rel=1e-6)
    assert got["explained_variance"] > 0.3  # the skip path learns much of W_out in 24 steps
    # `train --evaluate-at-end` found the same target and measured the same numbers.
    assert at_end["target_hook"] == NARROW
    for key in ("mse", "explained_variance", "l0", "ce_with_sae", "ce_zero_ablation", "kl_clean_sae"):
        assert at_end[key] == pytest.approx(got[key], rel=1e-9), key
    assert "ce_loss_recovered" in out and "Traceback" not in out


def test_cli_ce_is_the_transcoder_spliced_in_at_the_target_hook(trained, dumps, bridge):
    from train.evaluation.tokens import context_tokens

    got = json.loads((trained / "eval.json").read_text())
    dump, target = open_dump(dumps["hidden"]), open_dump(dumps["out"])
    tokens = context_tokens(dump, dump.manifest.n_contexts - HOLDOUT, HOLDOUT)
    mean = torch.tensor(target.manifest.stats["mean"])
    want = ce_metrics(bridge, load_sae(trained / "final"), WIDE, tokens, mean, True, 8, "cpu", target_hook=NARROW)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert got["ce_zero_ablation"] > got["ce_clean"] + 0.5  # MLP 0's output matters to this model


# ----------------------------------------------------------------------------- the model spliced


def _hf_spliced(hf_model, tokens: torch.Tensor, replace, skip_bos: bool) -> tuple[float, torch.Tensor]:
    """(mean CE, log-probs [n, T-1, vocab]) in float64 with MLP 0's output replaced by
    `replace(hidden, output)`, `hidden` the MLP's activations after the GELU (c_proj's input) of
    the same forward pass; None: clean. Plain torch forward hooks on the Hugging Face modules."""
    mlp = hf_model.transformer.h[0].mlp
    seen = {}

    def keep(module, inputs, output):
        seen["hidden"] = output

    def splice(module, inputs, output):
        new = replace(seen.pop("hidden"), output)
        if skip_bos:
            new = torch.cat([output[:, :1], new[:, 1:]], dim=1)
        return new

    handles = [mlp.act.register_forward_hook(keep), mlp.register_forward_hook(splice)] if replace else []
    return hooked_ce(hf_model, tokens, handles)


@pytest.fixture(scope="module")
def ce_tokens(hf_model) -> torch.Tensor:
    return rule_tokens(5, CONTEXT, torch.Generator().manual_seed(1), hf_model.config.vocab_size)


@pytest.mark.parametrize("skip_bos", [False, True])
def test_spliced_ce_equals_a_forward_spliced_by_hand(trained, bridge, hf_model, ce_tokens, skip_bos):
    sae = load_sae(trained / "final")
    mean = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 0.1
    got = ce_metrics(bridge, sae, WIDE, ce_tokens, mean, skip_bos, batch_size=3, device="cpu", target_hook=NARROW)

    clean, logp_clean = _hf_spliced(hf_model, ce_tokens, None, skip_bos)
    with_tc, logp_tc = _hf_spliced(hf_model, ce_tokens, lambda h, o: sae(h).sae_out, skip_bos)
    zero, _ = _hf_spliced(hf_model, ce_tokens, lambda h, o: torch.zeros_like(o), skip_bos)
    ablated, _ = _hf_spliced(hf_model, ce_tokens, lambda h, o: mean.expand_as(o), skip_bos)
    kl = float((logp_clean.exp() * (logp_clean - logp_tc)).sum(-1).mean())
    assert got["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert got["ce_with_sae"] == pytest.approx(with_tc, rel=1e-5)
    assert got["ce_zero_ablation"] == pytest.approx(zero, rel=1e-5)
    assert got["ce_mean_ablation"] == pytest.approx(ablated, rel=1e-5)
    assert got["kl_clean_sae"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert got["ce_loss_recovered"] == pytest.approx((zero - with_tc) / (zero - clean), rel=1e-4)
    # Not what the transcoder would give spliced in as an SAE at either hook alone: it read the input.
    assert abs(with_tc - clean) > 1e-4 and abs(with_tc - zero) > 1e-4


def test_an_exact_transcoder_recovers_all_of_the_loss(hf_model, bridge, ce_tokens, dumps, model_dir, tmp_path):
    sae = exact_transcoder(hf_model)
    got = ce_metrics(bridge, sae, WIDE, ce_tokens, torch.zeros(32), True, 2, "cpu", target_hook=NARROW)
    assert got["ce_zero_ablation"] > got["ce_clean"] + 0.5
    assert got["ce_with_sae"] == pytest.approx(got["ce_clean"], rel=1e-6)
    assert got["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert got["kl_clean_sae"] == pytest.approx(0.0, abs=1e-6)
    # From the command line, on the held-out contexts: all the target's variance, all the loss.
    folder = save_transcoder(sae, tmp_path / "exact", dumps, model_dir)
    code, out = evaluate(folder)
    assert code == 0, out
    result = json.loads((tmp_path / "exact" / "eval.json").read_text())
    assert result["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert result["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert result["kl_clean_sae"] == pytest.approx(0.0, abs=1e-6)
    assert result["target_hook"] == NARROW


def test_a_target_hook_that_runs_before_the_input_hook_is_refused(trained, bridge, ce_tokens):
    from shared.errors import UserError

    # Reversed: reading the MLP's output to write its hidden activations, earlier in the pass.
    cls = architecture_class("standard")
    backwards = cls(SAEConfig(32, 16, 128, apply_b_dec_to_input=False))
    with pytest.raises(UserError, match="runs before") as e:
        ce_metrics(bridge, backwards, NARROW, ce_tokens, torch.zeros(128), False, 2, "cpu", target_hook=WIDE)
    assert "\n" not in str(e.value)
    # The pairs `harvest --mlp-pairs` records (the MLP's input, or the residual before ln2, to its
    # output) splice in: the input hook fires first in the block.
    forward = cls(SAEConfig(32, 16, 32, apply_b_dec_to_input=False))
    for read in ("blocks.0.mlp.hook_in", "blocks.0.hook_resid_mid"):
        got = ce_metrics(bridge, forward, read, ce_tokens[:2], torch.zeros(32), False, 2, "cpu", target_hook=NARROW)
        assert got["ce_with_sae"] != got["ce_clean"]


# ----------------------------------------------------------------------------- refusals


def _one_line_error(code: int, out: str) -> str:
    assert code != 0 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return lines[0]


def test_a_missing_or_moved_target_dump_is_refused_naming_target_shards(dumps, hf_model, model_dir, tmp_path):
    moved = tmp_path / "moved_out"
    shutil.copytree(dumps["out"], moved)
    sae = exact_transcoder(hf_model)
    folder = save_transcoder(sae, tmp_path / "tc", dumps, model_dir)
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target"]["shards"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(cfg))
    line = _one_line_error(*evaluate(folder, "--no-model"))
    assert "--target-shards" in line and "not found" in line and "gone" in line
    # Pointed at where it moved: evaluated.
    code, out = evaluate(folder, "--no-model", "--target-shards", moved)
    assert code == 0, out
    assert json.loads((tmp_path / "tc" / "eval.json").read_text())["target_dump"] == str(moved)
    # No record of a target at all (a folder saved by hand): asked for.
    del cfg["target"]
    cfg_path.write_text(json.dumps(cfg))
    line = _one_line_error(*evaluate(folder, "--no-model"))
    assert "names no target dump" in line and "--target-shards" in line
    # The top examples need no target: features are of the input.
    code, out = evaluate(folder, "--top-examples", "2", "--features", "0")
    assert code == 0 and "feature 0:" in out, out
    # Further target dumps recorded without the first (a damaged record of several hooks a side,
    # tests/test_evaluate_clt.py): refused, not half-read.
    cfg_path.write_text(json.dumps({**cfg, "more_targets": [{"shards": str(moved), "hook_point": NARROW}]}))
    for args in ((), ("--top-examples", "2", "--features", "0")):
        line = _one_line_error(*evaluate(folder, "--no-model", *args))
        assert "more_targets but no target" in line


def test_a_target_of_another_pass_hook_or_width_is_refused(dumps, hf_model, model_dir, dataset, tmp_path):
    folder = save_transcoder(exact_transcoder(hf_model), tmp_path / "tc", dumps, model_dir)
    [other] = harvest_pass(model_dir, dataset, tmp_path / "other_pass", hooks=(NARROW,), tokens=4000)
    line = _one_line_error(*evaluate(folder, "--no-model", "--target-shards", other))
    assert "not from one harvest pass" in line and "pass_id" in line
    line = _one_line_error(*evaluate(folder, "--no-model", "--target-shards", dumps["resid"]))
    assert f"trained to write hook '{NARROW}'" in line and SAME_WIDTH in line
    line = _one_line_error(*evaluate(folder, "--no-model", "--target-shards", dumps["hidden"]))
    assert "writes d_out=32" in line and "128" in line
    # An SAE has no target dump to point at.
    cls = architecture_class("standard")
    sae_folder = cls(SAEConfig(32, 16)).save(tmp_path / "sae" / "final", {
        "shards": str(dumps["out"]), "model_name": str(model_dir), "hook_name": NARROW,
        "eval_holdout_contexts": HOLDOUT})
    line = _one_line_error(*evaluate(sae_folder, "--no-model", "--target-shards", dumps["out"]))
    assert "--target-shards is for transcoders only" in line
    code, out = evaluate(sae_folder, "--no-model")
    assert code == 0, out
    assert "target_hook" not in json.loads((tmp_path / "sae" / "eval.json").read_text())


# ----------------------------------------------------------------------------- the dashboard


def js_payload(path: Path):
    body = path.read_text(encoding="utf-8").split("\n", 1)[1].strip()
    match = re.fullmatch(r"DASH\.\w+ = (.*);", body) or re.fullmatch(r"DASH\.addFeatures\(\d+, (.*)\);", body)
    assert match, body[:80]
    return json.loads(match.group(1))


def test_dashboard_of_a_transcoder_writing_the_residual_stream(trained, dumps, bridge):
    from train.evaluation.logit_table import logit_effects, unembedding

    code, out = evaluate(trained, "--no-metrics", "--dashboard")
    assert code == 0, out
    data = trained / "dashboard" / "data"
    meta = js_payload(data / "meta.js")
    assert meta["has_logits"] and f"{WIDE} -> {NARROW}" in meta["subtitle"]
    records = js_payload(data / "features_0000.js")
    sae = load_sae(trained / "final")
    # The logit table follows the decoder into the space it writes (hook_mlp_out, d_model wide).
    want = logit_effects(sae.W_dec.detach(), unembedding(bridge), k=10)
    # Top examples are the input positions where a feature fires: its activation on the input's row.
    hidden = open_dump(dumps["hidden"])
    checked = 0
    for f, rec in records.items():
        f = int(f)
        assert [t for t, _ in rec["promoted"]] == want["top_tokens"][f].tolist()
        for act, row, *_ in rec["top"][:2]:
            with torch.no_grad():
                acts = sae.encode(hidden.activations(row, row + 1).float())
            assert act == pytest.approx(float(acts[0, f]), rel=1e-3)
            checked += 1
    assert checked > 0


def test_dashboard_of_a_transcoder_writing_another_width_leaves_out_the_logit_table(dumps, model_dir, tmp_path):
    # Reading the residual (32) and writing the MLP's hidden activations (128): not d_model wide.
    cls = architecture_class("standard")
    torch.manual_seed(0)
    sae = cls(SAEConfig(32, 16, 128, apply_b_dec_to_input=False))
    folder = save_transcoder(sae, tmp_path / "wide", dumps, model_dir, read="resid", write="hidden")
    got = CliRunner().invoke(evaluate_main, [str(folder), "--no-metrics", "--dashboard", "--device", "cpu"])
    assert got.exit_code == 0, got.output
    assert "no logit table" in got.output and "128-wide" in got.output and "Traceback" not in got.output
    meta = js_payload(tmp_path / "wide" / "dashboard" / "data" / "meta.js")
    assert not meta["has_logits"] and "no logit table" in meta["subtitle"]
