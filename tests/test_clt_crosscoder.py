"""Cross-layer transcoders (jumprelu_clt, topk_clt) and the acausal crosscoder: planted features
recovered, the decode into later layers by hand, folding and save/load, the memory refusal, and
from the command line on one harvest of the MLP pairs: training, resume bit for bit, a lockstep
sweep equal to separate runs, and circuit-tracer's form written from a trained CLT."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import write_token_dataset
from helpers import best_cos, harvest_pass, sparse_codes, train_planted, unit_rows
from shared.errors import UserError
from shared.reader import open_dump
from shared.saes import SAEConfig, architecture_class, load_sae
from train.batch import Batch

pytestmark = pytest.mark.usefixtures("one_thread")


def clt(arch: str, L: int, d: int, F_: int, d_out: int, **settings):
    cls = architecture_class(arch)
    shape = SAEConfig(L * d, L * F_, L * d_out, n_hooks=L, apply_b_dec_to_input=False)
    return cls(shape, cls.Settings(**({"k": 3} if arch == "topk_clt" else {}) | settings))


# ---- the model by hand ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["jumprelu_clt", "topk_clt"])
def test_clt_encodes_per_layer_and_decodes_into_every_later_layer(arch, tmp_path):
    L, d, F_, d_out = 3, 5, 8, 4
    torch.manual_seed(0)
    sae = clt(arch, L, d, F_, d_out)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    x = torch.randn(7, L * d)
    with torch.no_grad():
        f = sae.encode(x)
        out = sae(x).sae_out
        xs = x.reshape(7, L, d)
        for layer in range(L):  # layer l's features read only layer l's input
            h = xs[:, layer] @ sae.W_enc[layer] + sae.b_enc[layer]
            fl = f[:, layer * F_:(layer + 1) * F_]
            if arch == "jumprelu_clt":
                theta = sae.threshold[layer * F_:(layer + 1) * F_]
                torch.testing.assert_close(fl, torch.relu(h) * (h > theta))
            else:
                assert bool(((fl > 0).sum(dim=1) <= 3).all())
        for m in range(L):  # the output at layer m: every layer l <= m writes into it
            want = sae.b_dec[m * d_out:(m + 1) * d_out].expand(7, -1).clone()
            for layer in range(m + 1):
                want += f[:, layer * F_:(layer + 1) * F_] @ getattr(sae, f"W_dec_{layer}")[:, m - layer]
            torch.testing.assert_close(out[:, m * d_out:(m + 1) * d_out], want, rtol=1e-5, atol=1e-5)
        # Folded for inputs trained at scale a and targets at b, it computes the same on raw data.
        a, b = 2.5, 0.4
        trained = sae(a * x)
        folded = copy.deepcopy(sae)
        folded.fold_scaling_(a, b)
        torch.testing.assert_close(folded(x).sae_out, trained.sae_out / b, rtol=1e-5, atol=1e-5)
    folder = folded.save(tmp_path / "clt")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["n_hooks"] == L and cfg["apply_b_dec_to_input"] is False
    weights = load_file(folder / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (L, d, F_) and weights["W_dec_1"].shape == (F_, L - 1, d_out)
    loaded = load_sae(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sae_out, folded(x).sae_out)


def test_clt_shapes_and_memory_are_refused_up_front():
    with pytest.raises(UserError, match="--target-shards"):
        architecture_class("jumprelu_clt")(SAEConfig(6, 12, 6, n_hooks=2))
    with pytest.raises(UserError, match="no skip path"):
        clt("jumprelu_clt", 2, 3, 4, 3, skip_connection=True)
    with pytest.raises(UserError, match="at most the 4 features of a layer"):
        clt("topk_clt", 2, 3, 4, 3, k=5)
    # The decoders grow with the square of the layers: what the whole machine cannot hold is refused.
    from train.arch_settings import check_fits
    from train.config import LanguageModelSAERunnerConfig

    cls = architecture_class("jumprelu_clt")
    small, big = cls.training_bytes(10 * 64, 10 * 64, 10 * 256, 10, 4096), cls.training_bytes(
        40 * 64, 40 * 64, 40 * 256, 40, 4096)
    assert big > 40 * small / 10  # 4x the layers: more than 4x the memory
    cfg = LanguageModelSAERunnerConfig(architecture="jumprelu_clt", d_sae=32 * 65536)
    with pytest.raises(UserError, match=r"needs about .* GB, more than the .* GB of cpu") as e:
        check_fits([("clt", cfg)], 32 * 2048, 32 * 2048, 32, torch.device("cpu"))
    assert "\n" not in str(e.value)


# ---- planted features -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,want", [("topk_clt", 0.99), ("jumprelu_clt", 0.98)])
def test_clt_recovers_planted_cross_layer_features(arch, want):
    """3 layers; each has 16 planted features (3 on per row) read from its own input and writing
    into its own output and every later one through a planted decoder. Measured after 600 steps:
    topk_clt 0.994, jumprelu_clt 0.987 mean max cosine of the whole decoder rows."""
    L, d, n = 3, 16, 16
    g = torch.Generator().manual_seed(0)
    A = [unit_rows(n, d, g) for _ in range(L)]
    D = [unit_rows(n * (L - layer), d, g).reshape(n, L - layer, d) / (L - layer) ** 0.5 for layer in range(L)]

    def batch():
        a = [sparse_codes(256, n, g) for _ in range(L)]
        x = torch.cat([3 * a[layer] @ A[layer] + 0.3 * torch.randn(256, d, generator=g) for layer in range(L)], 1)
        y = torch.zeros(256, L, d)
        for layer in range(L):
            y[:, layer:] += 3 * torch.einsum("bf,fmd->bmd", a[layer], D[layer])
        return Batch(x, y.reshape(256, -1) + 0.2)

    torch.manual_seed(0)
    sae = clt(arch, L, d, 32, d)
    train_planted(sae, batch, 600)
    planted = torch.cat([F.pad(D[layer].reshape(n, -1), (layer * d, 0)) for layer in range(L)])
    best = best_cos(planted, sae.W_dec.detach())
    assert best.mean() >= want, (best.mean(), best.min())


def test_crosscoder_recovers_shared_and_hook_specific_features():
    """Two hooks (16 wide each): 12 features write both, 8 write only hook 0 and 8 only hook 1.
    The crosscoder must find all 28, the hook-specific ones with (almost) no decoder in the other
    hook: the L1 of the summed per-hook decoder norms makes writing where nothing is needed cost."""
    d, shared, own = 16, 12, 8
    g = torch.Generator().manual_seed(0)
    both = unit_rows(shared, 2 * d, g)
    only0 = F.pad(unit_rows(own, d, g), (0, d))
    only1 = F.pad(unit_rows(own, d, g), (d, 0))
    planted = torch.cat([both, only0, only1])  # [28, 2d]

    def batch():
        x = 3 * sparse_codes(256, len(planted), g) @ planted + 0.2
        return Batch(x, x)

    cls = architecture_class("crosscoder")
    torch.manual_seed(0)
    sae = cls(SAEConfig(2 * d, 64, n_hooks=2), cls.Settings(l1_coefficient=1.0))
    train_planted(sae, batch, 800)
    W = sae.W_dec.detach()
    best = best_cos(planted, W)
    assert best.mean() >= 0.98, (best.mean(), best.min())
    # Each hook-specific feature's match writes (almost) nothing into the other hook.
    match = (planted / planted.norm(dim=1, keepdim=True) @ (W / W.norm(dim=1, keepdim=True)).T).argmax(dim=1)
    norms = sae.hook_decoder_norms().detach()[match]  # [28, 2]
    assert bool((norms[shared:shared + own, 1] / norms[shared:shared + own, 0] < 0.1).all()), norms
    assert bool((norms[shared + own:, 0] / norms[shared + own:, 1] < 0.1).all()), norms


# ---- from the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_pairs(tiny_model, vocab_size, tmp_path_factory) -> tuple[str, str]:
    """Both layers' MLP inputs and outputs of the tiny model, from one pass: (inputs, outputs),
    each a comma-separated list in layer order."""
    ds = write_token_dataset(tmp_path_factory.mktemp("ds") / "tokens", n_docs=100, doc_len=100, vocab=vocab_size)
    hooks = ("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out")
    folders = harvest_pass(tiny_model, ds, tmp_path_factory.mktemp("pairs"), hooks=hooks)
    return f"{folders[0]},{folders[2]}", f"{folders[1]},{folders[3]}"


def _train(args):
    from train.cli import main

    got = CliRunner().invoke(main, [*args, "--quiet", "--device", "cpu", "--train-batch-size", "128",
                                    "--eval-holdout-contexts", "4", "--normalize-activations", "expected_norm"])
    assert got.exit_code == 0, got.output
    return got


def test_train_a_clt_from_the_cli_resume_it_and_write_circuit_tracers_form(mlp_pairs, tmp_path):
    inputs, outputs = mlp_pairs
    common = ["--shards", inputs, "--target-shards", outputs, "--architecture", "jumprelu_clt", "--d-sae", "128",
              "--total-training-tokens", str(128 * 16), "--n-checkpoints", "1", "--lr", "0.003"]
    _train([*common, "--checkpoint-path", str(tmp_path / "full")])
    final = tmp_path / "full" / "final"
    cfg = json.loads((final / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["n_hooks"], cfg["d_in"], cfg.get("d_out", 64)) == ("jumprelu_clt", 2, 64, 64)
    # The saved CLT maps raw MLP inputs of both layers to raw MLP outputs, better than their mean.
    sae = load_sae(final)
    x = torch.cat([open_dump(p).activations(0, 400).float() for p in inputs.split(",")], 1)
    y = torch.cat([open_dump(p).activations(0, 400).float() for p in outputs.split(",")], 1)
    with torch.no_grad():
        fve = 1 - (sae(x).sae_out - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert fve > 0.0, fve

    # Resumed (from a copy of the run, found with all four dumps from its record): identical bytes.
    import shutil

    [mid] = [p for p in (tmp_path / "full").iterdir() if p.name.isdigit()]
    shutil.copytree(tmp_path / "full", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "final")
    _train(["--resume-from", str(tmp_path / "copy" / mid.name)])
    assert (tmp_path / "copy" / "final" / "sae_weights.safetensors").read_bytes() == \
        (final / "sae_weights.safetensors").read_bytes()
    a, b = load_file(final / "trainer_state.safetensors"), load_file(tmp_path / "copy" / "final" / "trainer_state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Resuming with the layers in another order is refused in one line.
    from train.cli import main

    swapped = CliRunner().invoke(main, ["--resume-from", str(mid), "--quiet",
                                        "--shards", ",".join(reversed(inputs.split(","))),
                                        "--target-shards", ",".join(reversed(outputs.split(",")))])
    assert swapped.exit_code != 0 and "Traceback" not in swapped.output
    assert len([line for line in swapped.output.splitlines() if line.strip()]) == 1, swapped.output

    # circuit-tracer's form, written from the trained CLT.
    from train.export import main as export_main

    got = CliRunner().invoke(export_main, ["circuit-tracer", str(final), "--out", str(tmp_path / "ct")])
    assert got.exit_code == 0, got.output
    files = sorted(p.name for p in (tmp_path / "ct").iterdir())
    assert files == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_enc_0.safetensors", "W_enc_1.safetensors",
                     "config.yaml"]
    enc1 = load_file(tmp_path / "ct" / "W_enc_1.safetensors")
    torch.testing.assert_close(enc1["W_enc_1"], sae.W_enc[1].T.detach())
    torch.testing.assert_close(enc1["threshold_1"], sae.threshold[64:].detach())
    text = (tmp_path / "ct" / "config.yaml").read_text()
    assert "feature_input_hook: mlp.hook_in" in text and "feature_output_hook: hook_mlp_out" in text


def test_sweep_of_clts_in_lockstep_equals_separate_runs(mlp_pairs, tmp_path):
    inputs, outputs = mlp_pairs
    common = ["--shards", inputs, "--target-shards", outputs, "--d-sae", "128", "--total-training-tokens",
              str(128 * 8), "--architecture", "topk_clt"]
    _train([*common, "--sweep", "k=2,4", "--checkpoint-path", str(tmp_path / "sweep")])
    for k in ("2", "4"):
        _train([*common, "--k", k, "--checkpoint-path", str(tmp_path / f"solo_{k}")])
        solo = (tmp_path / f"solo_{k}" / "final" / "sae_weights.safetensors").read_bytes()
        assert (tmp_path / "sweep" / f"k_{k}" / "final" / "sae_weights.safetensors").read_bytes() == solo, k


def test_export_refuses_what_circuit_tracer_cannot_load(tmp_path):
    from train.export import main as export_main

    topk = clt("topk_clt", 2, 4, 8, 4).save(tmp_path / "topk_clt")
    cls = architecture_class("standard")
    sae = cls(SAEConfig(4, 8)).save(tmp_path / "sae")
    tk = architecture_class("topk")
    topk_tc = tk(SAEConfig(4, 8, 4, apply_b_dec_to_input=False), tk.Settings(k=2)).save(tmp_path / "topk_tc")
    for folders, says in (([topk], "circuit-tracer's CLTs are JumpReLU or ReLU"),
                          ([sae], "not a one-layer transcoder"),
                          ([topk_tc], "a topk_transcoder has no form in circuit-tracer")):
        got = CliRunner().invoke(export_main, ["circuit-tracer", *map(str, folders), "--out", str(tmp_path / "out")])
        assert got.exit_code == 2 and says in got.output, got.output
        assert len(got.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
