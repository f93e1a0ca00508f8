"""Transcoders and skip transcoders: every architecture encodes one hook and decodes into another
(`--target-shards`), recovers planted features, folds its scales, saves in SAELens' transcoder
form and loads back, trains from the command line, resumes bit for bit and sweeps in lockstep."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import write_token_dataset
from helpers import NARROW, WIDE, best_cos, harvest_pass, sparse_codes, train_planted, unit_rows
from shared.errors import UserError
from shared.reader import open_dump
from shared.saes import SAEConfig, architecture_class, load_sae
from shared.saes.transcoder_names import parse_saved_name, saved_name
from train.batch import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {"standard": {}, "jumprelu": {}, "gated": {}, "topk": {"k": 3}, "batchtopk": {"k": 3},
         "matryoshka_batchtopk": {"k": 3, "matryoshka_widths": [48, 64]}}


def transcoder(arch: str, d_in: int, d_sae: int, d_out: int, **settings):
    cls = architecture_class(arch)
    return cls(SAEConfig(d_in, d_sae, d_out, apply_b_dec_to_input=False), cls.Settings(**(ARCHS[arch] | settings)))


# ---- planted features ---------------------------------------------------------------------------
# Inputs in 32 dimensions are sums of 3 of 32 planted input directions A plus dense noise; the
# target, in 48 dimensions, writes the same 3 features through a planted decoder D (plus a bias):
# the transcoder must find which features are on from the input and write D's rows.
RECOVERY = {"topk": 0.99, "batchtopk": 0.99, "gated": 0.98, "standard": 0.98, "jumprelu": 0.98,
            "matryoshka_batchtopk": 0.97}
"""Mean max cosine of W_dec's rows with D's rows after 600 steps (measured: topk 0.996, batchtopk
0.991, gated 0.991, standard 0.989, jumprelu 0.988, matryoshka 0.983)."""


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transcoder_recovers_a_planted_decoder(arch):
    g = torch.Generator().manual_seed(0)
    A, D = unit_rows(32, 32, g), unit_rows(32, 48, g)

    def batch():
        a = sparse_codes(256, 32, g)
        return Batch(3 * (a @ A) + 0.5 * torch.randn(256, 32, generator=g), 3 * (a @ D) + 0.3)

    torch.manual_seed(0)
    sae = transcoder(arch, 32, 64, 48)
    res = train_planted(sae, batch, 600)
    best = best_cos(D, sae.W_dec.detach())
    assert best.mean() >= RECOVERY[arch], (best.mean(), best.min())
    assert 1 - res.sum_sq_err / res.sum_sq_total > 0.75  # the noise in x is not in t: not 1.0


def test_skip_transcoder_recovers_its_linear_part_and_features():
    """The target = features that are even in the input (a pair of opposite input directions
    writes one output direction, so they have no linear part) + a known linear map S of the
    input's dense part. W_skip must find S, the features the rest.

    What is compared for the features is each planted feature's response (the output for that
    feature alone, minus the output at 0), not W_dec's rows: on the directions features read, the
    split between W_skip and the decoder is not identifiable (W_dec_j + A_j M and W_skip - M
    compute the same function on those inputs), so the rows drift with the skip's part there
    while the response stays the planted one."""
    g = torch.Generator().manual_seed(0)
    half = unit_rows(24, 32, g)
    A = torch.cat([half, -half])  # 48 input features
    Dh = unit_rows(24, 40, g)
    D = torch.cat([Dh, Dh])
    S = torch.randn(40, 16, generator=g) * 0.5  # the linear part, on the 16 dense dimensions

    def batch():
        a = sparse_codes(256, 48, g)
        z = torch.randn(256, 16, generator=g)
        return Batch(torch.cat([3 * (a @ A), z], 1), 3 * (a @ D) + z @ S.T + 0.3)

    torch.manual_seed(0)
    sae = transcoder("topk", 48, 96, 40, skip_connection=True)
    res = train_planted(sae, batch, 800)
    assert 1 - res.sum_sq_err / res.sum_sq_total > 0.98
    skip_error = (sae.W_skip.detach()[:, 32:] - S).norm() / S.norm()
    assert skip_error < 0.05, skip_error
    with torch.no_grad():
        alone = torch.cat([3 * A, torch.zeros(48, 16)], 1)
        response = sae(alone).sae_out - sae(torch.zeros(1, 48)).sae_out
    cos = torch.nn.functional.cosine_similarity(response, 3 * D, dim=1)
    assert cos.mean() >= 0.99, (cos.mean(), cos.min())


# ---- the model: shapes, skip path, folding, saving ------------------------------------------------
def _perturbed(sae, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_transcoder_forward_fold_and_save_load(arch, skip, tmp_path):
    torch.manual_seed(1)
    sae = _perturbed(transcoder(arch, 6, 64, 5, skip_connection=skip))
    assert sae.W_enc.shape == (6, 64) and sae.W_dec.shape == (64, 5) and sae.b_dec.shape == (5,)
    x = torch.randn(20, 6)
    with torch.no_grad():
        out = sae(x)
        # The encoder reads x itself (no b_dec in the input's space); the skip path adds x W_skip^T.
        f = sae.encode(x)
        want = f @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if skip else 0)
        torch.testing.assert_close(out.sae_out, want)
        b_dec_moved = copy.deepcopy(sae)
        b_dec_moved.b_dec.add_(1.0)
        torch.testing.assert_close(b_dec_moved.encode(x), f)
        # Trained on a x and b t, folded, it computes the same on raw x in t's units.
        a, b = 2.5, 0.4
        trained = sae(a * x)
        folded = copy.deepcopy(sae)
        folded.fold_scaling_(a, b)
        got = folded(x)
    torch.testing.assert_close(got.feature_acts, trained.feature_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sae_out, trained.sae_out / b, rtol=1e-5, atol=1e-5)

    folder = folded.save(tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == 5 and cfg["d_in"] == 6
    assert cfg["architecture"] == saved_name(sae.inference_form()[0], True, skip)
    assert ("W_skip" in load_file(folder / "sae_weights.safetensors")) == skip
    loaded = load_sae(folder)
    assert loaded.cfg.transcoder and loaded.settings.skip_connection == skip
    with torch.no_grad():
        again = loaded(x)
    torch.testing.assert_close(again.sae_out, got.sae_out)
    torch.testing.assert_close(again.feature_acts, got.feature_acts)


def test_saved_names_are_saelens_transcoder_classes_where_it_has_them():
    assert saved_name("standard", True, False) == "transcoder"
    assert saved_name("standard", True, True) == "skip_transcoder"
    assert saved_name("jumprelu", True, False) == "jumprelu_transcoder"
    assert saved_name("jumprelu", True, True) == "jumprelu_skip_transcoder"
    assert saved_name("topk", True, True) == "topk_skip_transcoder"
    assert saved_name("topk", False, False) == "topk"
    for name in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
                 "topk_transcoder", "gated_skip_transcoder", "standard", "topk"):
        parsed = parse_saved_name(name)
        assert saved_name(*parsed) == name
    # BatchTopK and Matryoshka save as JumpReLU: SAELens loads them as its JumpReLU transcoder.
    for arch in ("batchtopk", "matryoshka_batchtopk"):
        assert transcoder(arch, 6, 64, 5).saved_form()[0] == "jumprelu_transcoder"


def test_shapes_and_settings_an_sae_cannot_have_are_refused(tmp_path):
    cls = architecture_class("standard")
    with pytest.raises(UserError, match="train a transcoder"):
        cls(SAEConfig(4, 8, 5))
    with pytest.raises(UserError, match="skip_connection .* needs a target dump"):
        cls(SAEConfig(4, 8), cls.Settings(skip_connection=True))
    folder = transcoder("standard", 6, 64, 5, skip_connection=True).save(tmp_path / "tc")
    cfg_path = folder / "cfg.json"
    for key, value, says in (("apply_b_dec_to_input", True, "apply_b_dec_to_input is True"),
                             ("skip_connection", False, "skip_connection is False"),
                             ("architecture", "transcoder", "has no skip path")):
        edited = json.loads(cfg_path.read_text()) | {key: value}
        damaged = tmp_path / f"bad_{key}"
        damaged.mkdir()
        (damaged / "cfg.json").write_text(json.dumps(edited))
        (damaged / "sae_weights.safetensors").write_bytes((folder / "sae_weights.safetensors").read_bytes())
        with pytest.raises(UserError, match=says) as e:
            load_sae(damaged)
        assert "\n" not in str(e.value)


# ---- from the command line: train, resume, sweep ---------------------------------------------------
@pytest.fixture(scope="module")
def mlp_pair(tiny_model, vocab_size, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model's MLP hidden activations (128 wide) and its MLP output (32), one pass."""
    ds = write_token_dataset(tmp_path_factory.mktemp("ds") / "tokens", n_docs=100, doc_len=100, vocab=vocab_size)
    hidden, out = harvest_pass(tiny_model, ds, tmp_path_factory.mktemp("pair"), hooks=(WIDE, NARROW))
    return Path(hidden), Path(out)


def _train(args, **kw):
    from train.cli import main

    got = CliRunner().invoke(main, [*args, "--quiet", "--device", "cpu", "--train-batch-size", "128",
                                    "--d-sae", "64", "--eval-holdout-contexts", "4",
                                    "--normalize-activations", "expected_norm"], **kw)
    assert got.exit_code == 0, got.output
    return got


def test_train_a_skip_transcoder_from_the_cli_and_resume_it_bit_for_bit(mlp_pair, tmp_path):
    hidden, out = mlp_pair
    common = ["--shards", str(hidden), "--target-shards", str(out), "--skip-connection",
              "--architecture", "topk", "--k", "8", "--total-training-tokens", str(128 * 24),
              "--n-checkpoints", "1", "--lr", "0.01"]
    _train([*common, "--checkpoint-path", str(tmp_path / "full")])
    final = tmp_path / "full" / "final"
    cfg = json.loads((final / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_skip_transcoder" and (cfg["d_in"], cfg["d_out"]) == (128, 32)
    assert cfg["metadata"]["hook_name"] == WIDE and cfg["target"]["hook_point"] == NARROW
    assert cfg["metadata"]["hook_name_out"] == NARROW  # where SAELens reads a transcoder's output hook
    # The saved transcoder maps raw MLP hidden activations to raw MLP outputs.
    sae = load_sae(final)
    x, t = open_dump(hidden).activations(0, 400).float(), open_dump(out).activations(0, 400).float()
    with torch.no_grad():
        err = (sae(x).sae_out - t).pow(2).sum() / (t - t.mean(0)).pow(2).sum()
    assert err < 0.5, err  # a linear map (W_out) the skip path learns quickly

    [mid] = [p for p in (tmp_path / "full").iterdir() if p.name.isdigit()]
    # Resumed from the mid checkpoint, found with its target dump from the run's own record.
    _train(["--resume-from", str(mid)])
    a = load_file(final / "trainer_state.safetensors")
    resumed_final = tmp_path / "full" / "final"
    assert a.keys() == load_file(resumed_final / "trainer_state.safetensors").keys()
    # Train the same run elsewhere, resumed from a copy of the checkpoint: identical bytes.
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "final")
    _train(["--resume-from", str(tmp_path / "copy" / mid.name)])
    assert (tmp_path / "copy" / "final" / "sae_weights.safetensors").read_bytes() == \
        (final / "sae_weights.safetensors").read_bytes()
    b = load_file(tmp_path / "copy" / "final" / "trainer_state.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_without_the_target_or_with_another_skip_setting_is_refused(mlp_pair, tmp_path):
    hidden, out = mlp_pair
    _train(["--shards", str(hidden), "--target-shards", str(out), "--total-training-tokens", str(128 * 8),
            "--n-checkpoints", "1", "--checkpoint-path", str(tmp_path / "r")])
    [mid] = [p for p in (tmp_path / "r").iterdir() if p.name.isdigit()]
    from train.cli import main

    got = CliRunner().invoke(main, ["--resume-from", str(mid), "--skip-connection", "--quiet"])
    assert got.exit_code != 0 and "skip_connection" in got.output and "Traceback" not in got.output


def test_sweep_of_transcoders_and_skip_transcoders_equals_separate_runs(mlp_pair, tmp_path):
    hidden, out = mlp_pair
    common = ["--shards", str(hidden), "--target-shards", str(out), "--total-training-tokens", str(128 * 10)]
    _train([*common, "--sweep", "skip_connection=false,true", "--sweep", "l1_coefficient=0.3,1",
            "--checkpoint-path", str(tmp_path / "sweep")])
    for l1 in ("0.3", "1"):
        for skip in (False, True):
            flags = ["--l1-coefficient", l1] + (["--skip-connection"] if skip else [])
            _train([*common, *flags, "--checkpoint-path", str(tmp_path / f"solo_{l1}_{skip}")])
            solo = tmp_path / f"solo_{l1}_{skip}" / "final" / "sae_weights.safetensors"
            [swept] = [p for p in (tmp_path / "sweep").iterdir()
                       if p.is_dir() and f"l1_coefficient_{l1}" in p.name and f"skip_connection_{skip}" in p.name]
            assert (swept / "final" / "sae_weights.safetensors").read_bytes() == solo.read_bytes(), swept.name
