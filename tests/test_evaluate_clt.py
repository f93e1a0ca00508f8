"""`evaluate` on cross-layer transcoders and crosscoders (several hooks a side): every dump of each
side read and checked, per-hook and per-layer figures equal to a hand computation, the CLT's
replacement model (every covered MLP output replaced at once) equal to a forward spliced by hand in
plain Hugging Face GPT-2, an exact CLT recovering all of the loss, a CLT writing only its bias
equal to mean ablation, refusals in one line, and the dashboard."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import write_token_dataset
from helpers import harvest_pass, hooked_ce
from shared.reader import open_dump
from shared.saes import SAEConfig, architecture_class, load_sae
from train.evaluation.cli import main as evaluate_main
from train.evaluation.downstream import clt_layer_features, clt_outputs_at, replacement_ce_metrics

pytestmark = pytest.mark.usefixtures("one_thread_module")

HOLDOUT = 4
IN = ("blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in")
OUT = ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")


@pytest.fixture(scope="module")
def relu_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny 2-layer GPT-2 with ReLU MLPs (a CLT, one JumpReLU feature per hidden unit, can
    then compute each MLP exactly), trained briefly so that ablating the MLPs costs loss."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from transformers import GPT2Config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(str(tiny_model), activation_function="relu"))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # each token a fixed function of the last: the MLPs come to matter
        seq = [torch.randint(1, model.config.vocab_size, (16, 1), generator=g)]
        for _ in range(31):
            seq.append((seq[-1] * 5 + 3) % (model.config.vocab_size - 1) + 1)
        toks = torch.cat(seq, dim=1)
        loss = model(toks, labels=toks).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("relu_model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(relu_model, vocab_size, tmp_path_factory) -> dict[str, Path]:
    """Both layers' MLP inputs and outputs, from one harvest pass (BOS skipped)."""
    ds = write_token_dataset(tmp_path_factory.mktemp("ds") / "tokens", n_docs=100, doc_len=100, vocab=vocab_size)
    folders = harvest_pass(relu_model, ds, tmp_path_factory.mktemp("pairs"), hooks=(IN[0], OUT[0], IN[1], OUT[1]),
                           tokens=4000)
    return dict(zip(("in0", "out0", "in1", "out1"), folders))


def inputs(p) -> str:
    return f"{p['in0']},{p['in1']}"


def outputs(p) -> str:
    return f"{p['out0']},{p['out1']}"


def train_cli(*args: str) -> None:
    from train.cli import main

    got = CliRunner().invoke(main, [*args, "--quiet", "--device", "cpu", "--train-batch-size", "128", "--d-sae", "64",
                                    "--eval-holdout-contexts", str(HOLDOUT), "--normalize-activations",
                                    "expected_norm", "--total-training-tokens", str(128 * 8), "--lr", "0.003"])
    assert got.exit_code == 0, got.output


@pytest.fixture(scope="module")
def clt_run(pairs, tmp_path_factory) -> Path:
    """A jumprelu_clt over both layers, trained from the command line and evaluated at its end."""
    run = tmp_path_factory.mktemp("clt") / "run"
    train_cli("--shards", inputs(pairs), "--target-shards", outputs(pairs), "--architecture", "jumprelu_clt",
              "--checkpoint-path", str(run), "--evaluate-at-end")
    return run


@pytest.fixture(scope="module")
def cc_run(pairs, tmp_path_factory) -> Path:
    """A crosscoder over both layers' MLP outputs."""
    run = tmp_path_factory.mktemp("cc") / "run"
    train_cli("--shards", outputs(pairs), "--architecture", "crosscoder", "--checkpoint-path", str(run))
    return run


@pytest.fixture(scope="module")
def bridge(relu_model):
    from shared.models import load_model

    return load_model(str(relu_model), "cpu")


@pytest.fixture(scope="module")
def hf_model(relu_model):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(relu_model)).eval()


def evaluate(*args) -> tuple[int, str]:
    got = CliRunner().invoke(evaluate_main, [*map(str, args), "--quiet", "--device", "cpu"])
    return got.exit_code, got.output


def one_line_error(code: int, out: str) -> str:
    assert code != 0 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return lines[0]


def heldout(*paths: Path) -> torch.Tensor:
    """The rows of the last HOLDOUT contexts of each dump, side by side, float64."""
    parts = []
    for path in paths:
        dump = open_dump(path)
        parts.append(dump.activations(dump.n_rows - HOLDOUT * dump.manifest.rows_per_context, dump.n_rows).double())
    return torch.cat(parts, dim=1)


def random_clt(arch: str, d: int = 32, F_: int = 16, scale: float = 0.3, seed: int = 0):
    cls = architecture_class(arch)
    sae = cls(SAEConfig(2 * d, 2 * F_, 2 * d, n_hooks=2, apply_b_dec_to_input=False),
              cls.Settings(**({"k": 4} if arch == "topk_clt" else {})))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "log_threshold":
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return sae


# ----------------------------------------------------------------------------- the CLT by layers


@pytest.mark.parametrize("arch", ["jumprelu_clt", "topk_clt"])
def test_layer_features_and_outputs_at_a_layer_are_the_clts_own(arch):
    sae = random_clt(arch)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        f = sae.encode(x)
        feats = [clt_layer_features(sae, x[:, 32 * layer:32 * (layer + 1)], layer) for layer in range(2)]
        assert any(bool((fl > 0).any()) for fl in feats)
        torch.testing.assert_close(torch.cat(feats, 1), f)
        y = sae.decode(f)
        for m in range(2):
            torch.testing.assert_close(clt_outputs_at(sae, feats[:m + 1], m), y[:, 32 * m:32 * (m + 1)])


# ----------------------------------------------------------------------------- held-out metrics


def test_per_hook_and_per_layer_metrics_of_a_clt_by_hand(clt_run, pairs):
    at_end = json.loads((clt_run / "eval.json").read_text())
    code, out = evaluate(clt_run)
    assert code == 0, out
    got = json.loads((clt_run / "eval.json").read_text())
    assert got["hooks"] == list(IN) and got["target_hooks"] == list(OUT)
    assert got["dumps"] == [str(pairs["in0"]), str(pairs["in1"])]
    assert got["target_dumps"] == [str(pairs["out0"]), str(pairs["out1"])]
    sae = load_sae(clt_run / "final")
    x, t = heldout(pairs["in0"], pairs["in1"]), heldout(pairs["out0"], pairs["out1"])
    with torch.no_grad():
        res = sae(x.float())
    t_hat, f = res.sae_out.double(), res.feature_acts
    assert got["n_rows"] == len(t)
    err = (t - t_hat).pow(2)
    var = (t - t.mean(0)).pow(2)
    assert got["explained_variance"] == pytest.approx(1 - float(err.sum() / var.sum()), rel=1e-6)
    assert got["mse"] == pytest.approx(float(err.sum()) / len(t), rel=1e-6)
    for m in range(2):
        block = slice(32 * m, 32 * (m + 1))
        assert got["explained_variance_per_hook"][m] == pytest.approx(
            1 - float(err[:, block].sum() / var[:, block].sum()), rel=1e-6)
        assert got["mse_per_hook"][m] == pytest.approx(float(err[:, block].sum()) / len(t), rel=1e-6)
        fl = f[:, 32 * m:32 * (m + 1)]  # d_sae 64: 32 features a layer
        assert got["l0_per_layer"][m] == pytest.approx(float((fl > 0).sum(1).double().mean()))
        assert got["frac_dead_per_layer"][m] == pytest.approx(float(((fl > 0).sum(0) == 0).double().mean()))
    assert sum(got["l0_per_layer"]) == pytest.approx(got["l0"])
    assert sum(got["mse_per_hook"]) == pytest.approx(got["mse"])
    assert "ce_loss_recovered" in got and "ce_not_measured" not in got
    # `train --evaluate-at-end` found every dump and measured the same.
    for key in ("mse", "explained_variance_per_hook", "l0_per_layer", "ce_with_sae", "ce_mean_ablation"):
        assert at_end[key] == pytest.approx(got[key], rel=1e-9), key


def test_crosscoder_gets_per_hook_reconstruction_and_no_ce(cc_run, pairs):
    code, out = evaluate(cc_run)
    assert code == 0, out
    assert "CE not measured" in out
    got = json.loads((cc_run / "eval.json").read_text())
    assert got["hooks"] == list(OUT) and "target_hooks" not in got and "l0_per_layer" not in got
    assert not any(k.startswith(("ce_loss", "ce_with", "kl_")) for k in got)
    assert "not defined" in got["ce_not_measured"]
    sae = load_sae(cc_run / "final")
    x = heldout(pairs["out0"], pairs["out1"])
    with torch.no_grad():
        res = sae(x.float())
    err, var = (x - res.sae_out.double()).pow(2), (x - x.mean(0)).pow(2)
    for k in range(2):
        block = slice(32 * k, 32 * (k + 1))
        assert got["explained_variance_per_hook"][k] == pytest.approx(
            1 - float(err[:, block].sum() / var[:, block].sum()), rel=1e-6)
    assert got["l0"] == pytest.approx(float((res.feature_acts > 0).sum(1).double().mean()))


# ----------------------------------------------------------------------------- the replacement model


def _hf_replaced(hf_model, tokens: torch.Tensor, replace, skip_bos: bool) -> tuple[float, torch.Tensor]:
    """(mean CE, log-probs) in float64 with each MLP's output replaced by `replace(layer, inputs,
    output)`, `inputs` the list of MLP inputs seen so far in this forward pass (each from the
    model as replaced so far); None: clean. Plain torch forward hooks on the HF MLP modules."""
    seen: list[torch.Tensor] = []

    def hook(layer):
        def fn(module, args, output):
            seen.append(args[0])
            new = replace(layer, list(seen), output)
            if skip_bos:
                new = torch.cat([output[:, :1], new[:, 1:]], dim=1)
            return new
        return fn

    handles = [blk.mlp.register_forward_hook(hook(i)) for i, blk in enumerate(hf_model.transformer.h)] if replace \
        else []
    return hooked_ce(hf_model, tokens, handles)


@pytest.fixture(scope="module")
def tokens(vocab_size) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.cat([torch.zeros(5, 1, dtype=torch.long), torch.randint(1, vocab_size, (5, 31), generator=g)], 1)


def _by_hand(sae):
    """Layer m's output written out: the features of each layer l <= m from that layer's input
    (the CLT's own encode, the other layers' inputs zero), through W_dec_l[:, m - l], plus b_dec."""
    def replace(m, xs, output):
        out = sae.b_dec[32 * m:32 * (m + 1)].clone()
        for layer in range(m + 1):
            padded = torch.zeros(*xs[layer].shape[:-1], 64)
            padded[..., 32 * layer:32 * (layer + 1)] = xs[layer]
            f = sae.encode(padded)[..., 16 * layer:16 * (layer + 1)]
            out = out + f @ getattr(sae, f"W_dec_{layer}")[:, m - layer]
        return out
    return replace


@pytest.mark.parametrize("arch,skip_bos", [("jumprelu_clt", False), ("jumprelu_clt", True), ("topk_clt", True)])
def test_replacement_ce_equals_a_forward_replaced_by_hand(arch, skip_bos, bridge, hf_model, tokens):
    sae = random_clt(arch, scale=0.3)
    mean = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        got = replacement_ce_metrics(bridge, sae, IN, OUT, tokens, mean, skip_bos, batch_size=2, device="cpu")
        clean, logp_clean = _hf_replaced(hf_model, tokens, None, skip_bos)
        with_clt, logp = _hf_replaced(hf_model, tokens, _by_hand(sae), skip_bos)
    zero, _ = _hf_replaced(hf_model, tokens, lambda m, xs, o: torch.zeros_like(o), skip_bos)
    ablated, _ = _hf_replaced(hf_model, tokens, lambda m, xs, o: mean[32 * m:32 * (m + 1)].expand_as(o), skip_bos)
    kl = float((logp_clean.exp() * (logp_clean - logp)).sum(-1).mean())
    assert got["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert got["ce_with_sae"] == pytest.approx(with_clt, rel=1e-5)
    assert got["ce_zero_ablation"] == pytest.approx(zero, rel=1e-5)
    assert got["ce_mean_ablation"] == pytest.approx(ablated, rel=1e-5)
    assert got["kl_clean_sae"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    # Both layers replaced at once: not what a forward with only layer 1 replaced gives.
    only_1, _ = _hf_replaced(hf_model, tokens, lambda m, xs, o: _by_hand(sae)(m, xs, o) if m == 1 else o, skip_bos)
    assert abs(with_clt - only_1) > 1e-4


def exact_clt(hf_model, arch: str = "jumprelu_clt"):
    """A CLT computing both ReLU MLPs exactly: layer l's 128 features are its MLP's hidden units
    (W_enc = c_fc's weight, b_enc its bias, threshold ~0), written into its own output only through
    c_proj (GPT-2's Conv1D computes x @ W + b), b_dec the c_proj biases."""
    cls = architecture_class(arch)
    sae = cls(SAEConfig(64, 256, 64, n_hooks=2, apply_b_dec_to_input=False),
              cls.Settings(**({"k": 128} if arch == "topk_clt" else {"jumprelu_init_threshold": 1e-30})))
    with torch.no_grad():
        for layer, block in enumerate(hf_model.transformer.h):
            sae.W_enc[layer].copy_(block.mlp.c_fc.weight)
            sae.b_enc[layer].copy_(block.mlp.c_fc.bias)
            w = getattr(sae, f"W_dec_{layer}")
            w.zero_()
            w[:, 0].copy_(block.mlp.c_proj.weight)
            sae.b_dec[32 * layer:32 * (layer + 1)].copy_(block.mlp.c_proj.bias)
    return sae


@pytest.mark.parametrize("arch", ["jumprelu_clt", "topk_clt"])
def test_an_exact_clt_recovers_all_of_the_loss(arch, bridge, hf_model, tokens):
    got = replacement_ce_metrics(bridge, exact_clt(hf_model, arch), IN, OUT, tokens, torch.zeros(64), True, 5, "cpu")
    assert got["ce_zero_ablation"] > got["ce_clean"] + 0.05, got
    assert got["ce_with_sae"] == pytest.approx(got["ce_clean"], rel=1e-6)
    assert got["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert got["kl_clean_sae"] == pytest.approx(0.0, abs=1e-6)


def test_a_clt_writing_only_the_mean_is_mean_ablation(bridge, tokens):
    sae = random_clt("jumprelu_clt")
    mean = torch.randn(64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for w in sae.decoders():
            w.zero_()
        sae.b_dec.copy_(mean)
    got = replacement_ce_metrics(bridge, sae, IN, OUT, tokens, mean, False, 2, "cpu")
    assert got["ce_with_sae"] == pytest.approx(got["ce_mean_ablation"], rel=1e-9)
    assert got["ce_loss_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-9)


def test_an_output_hook_before_its_input_hook_is_refused(bridge, tokens):
    from shared.errors import UserError

    with pytest.raises(UserError, match="runs before") as e:
        replacement_ce_metrics(bridge, random_clt("jumprelu_clt"), IN[::-1], OUT, tokens, torch.zeros(64), False, 2,
                               "cpu")
    assert "\n" not in str(e.value)


def test_exact_clt_from_the_command_line(hf_model, pairs, relu_model, tmp_path):
    sae = exact_clt(hf_model)
    ident = lambda key, path: {"shards": str(path), "hook_point": open_dump(path).manifest.hook,  # noqa: E731
                               key: 32}
    folder = sae.save(tmp_path / "exact" / "final", {
        "shards": str(pairs["in0"]), "hook_name": IN[0], "model_name": str(relu_model),
        "eval_holdout_contexts": HOLDOUT, "more_inputs": [ident("d_in_dump", pairs["in1"])],
        "target": ident("d_out_dump", pairs["out0"]), "more_targets": [ident("d_out_dump", pairs["out1"])]})
    code, out = evaluate(folder)
    assert code == 0, out
    got = json.loads((tmp_path / "exact" / "eval.json").read_text())
    assert got["explained_variance_per_hook"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert got["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert got["kl_clean_sae"] == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- refusals


def test_moved_dumps_are_refused_naming_the_flag_and_found_with_it(clt_run, pairs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clt_run, run)
    moved = {k: tmp_path / "moved" / k for k in ("in1", "out1")}
    for k, dest in moved.items():
        shutil.copytree(pairs[k], dest)
    cfg_path = run / "final" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["more_inputs"][0]["shards"] = str(tmp_path / "gone_in")
    cfg_path.write_text(json.dumps(cfg))
    line = one_line_error(*evaluate(run, "--no-model"))
    assert "--shards" in line and "not found" in line and "gone_in" in line
    code, out = evaluate(run, "--no-model", "--shards", f"{pairs['in0']},{moved['in1']}")
    assert code == 0, out
    cfg["more_targets"][0]["shards"] = str(tmp_path / "gone_out")
    cfg_path.write_text(json.dumps(cfg))
    line = one_line_error(*evaluate(run, "--no-model", "--shards", f"{pairs['in0']},{moved['in1']}"))
    assert "--target-shards" in line and "not found" in line and "gone_out" in line
    code, out = evaluate(run, "--no-model", "--shards", f"{pairs['in0']},{moved['in1']}",
                         "--target-shards", f"{pairs['out0']},{moved['out1']}")
    assert code == 0, out
    got = json.loads((run / "eval.json").read_text())
    assert got["dumps"][1] == str(moved["in1"]) and got["target_dumps"][1] == str(moved["out1"])
    # One dump where the side has two; the layers in another order.
    line = one_line_error(*evaluate(run, "--no-model", "--shards", str(pairs["in0"]),
                                    "--target-shards", outputs(pairs)))
    assert "names 1 dump(s)" in line and "2" in line
    line = one_line_error(*evaluate(run, "--no-model", "--shards", inputs(pairs),
                                    "--target-shards", f"{pairs['out1']},{pairs['out0']}"))
    assert f"was hook '{OUT[0]}'" in line and "--target-shards" in line


def test_dumps_of_another_pass_are_refused(clt_run, cc_run, pairs, relu_model, vocab_size, tmp_path):
    ds = write_token_dataset(tmp_path / "ds", n_docs=100, doc_len=100, vocab=vocab_size)
    [other] = harvest_pass(relu_model, ds, tmp_path / "other", hooks=(OUT[1],), tokens=4000)
    line = one_line_error(*evaluate(clt_run, "--no-model", "--target-shards", f"{pairs['out0']},{other}"))
    assert "not from one harvest pass" in line
    line = one_line_error(*evaluate(cc_run, "--no-model", "--shards", f"{pairs['out0']},{other}"))
    assert "not from one harvest pass" in line
    line = one_line_error(*evaluate(cc_run, "--no-model", "--target-shards", outputs(pairs)))
    assert "--target-shards is for transcoders only" in line


# ----------------------------------------------------------------------------- the dashboard


def js_payload(path: Path):
    body = path.read_text(encoding="utf-8").split("\n", 1)[1].strip()
    match = re.fullmatch(r"DASH\.\w+ = (.*);", body) or re.fullmatch(r"DASH\.addFeatures\(\d+, (.*)\);", body)
    assert match, body[:80]
    return json.loads(match.group(1))


def test_dashboards_of_a_clt_and_a_crosscoder(clt_run, cc_run, pairs, bridge):
    from train.evaluation.logit_table import logit_effects, unembedding

    code, out = evaluate(clt_run, "--no-metrics", "--dashboard")
    assert code == 0, out
    meta = js_payload(clt_run / "dashboard" / "data" / "meta.js")
    assert meta["has_logits"] and meta["n_features"] == 64 and "cross-layer transcoder" in meta["subtitle"]
    records = js_payload(clt_run / "dashboard" / "data" / "features_0000.js")
    sae = load_sae(clt_run / "final")
    # A feature's logit effect: its decoder rows into every layer it writes, summed, @ W_U.
    summed = sae.W_dec.detach().reshape(64, 2, 32).sum(1)
    want = logit_effects(summed, unembedding(bridge), k=10)
    x = torch.cat([open_dump(pairs[k]).activations(0, open_dump(pairs[k]).n_rows).float() for k in ("in0", "in1")], 1)
    with torch.no_grad():
        acts = sae.encode(x)
    checked = 0
    for f, rec in records.items():
        f = int(f)
        assert [t for t, _ in rec["promoted"]] == want["top_tokens"][f].tolist()
        for act, row, *_ in rec["top"][:2]:  # top examples are input rows: feature f of layer f // 32
            assert act == pytest.approx(float(acts[row, f]), rel=1e-3)
            checked += 1
    assert checked > 0
    code, out = evaluate(cc_run, "--no-metrics", "--dashboard")
    assert code == 0, out
    meta = js_payload(cc_run / "dashboard" / "data" / "meta.js")
    assert not meta["has_logits"] and "no logit table" in meta["subtitle"] and "crosscoder" in meta["subtitle"]
    # Top examples of a CLT's features, from the command line.
    code, out = evaluate(clt_run, "--top-examples", "2", "--features", "0,40")
    assert code == 0 and "feature 40:" in out, out
