"""Architectures own their settings: one declaration (type, default, range, docstring) in their
`Settings` dataclass gives the config key, the flag, the sweep key, the checks and the docs; the
config is typed parts behind the seed's flat names, and folders written before still load."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from shared.errors import UserError
from shared.saes import ARCHITECTURES, SAEConfig
from shared.saes.standard import StandardSAE, StandardSettings
from shared.settings import POSITIVE, field_docs, setting
from train.arch_settings import check_settings_used, used_settings
from train.cli import main as train_main
from train.config import PARTS, LanguageModelSAERunnerConfig, flat_fields
from train.config.table import settings_table, table_span, with_table
from train.distributed import check_data_parallel
from train.sweep import check_sweep, grid

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToySettings(StandardSettings):
    toy_setting: int = setting(3, POSITIVE)
    """Toys per feature."""


class ToySAE(StandardSAE):
    architecture = "toy"
    Settings = ToySettings
    batch_wide_selection = True


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "toy", ToySAE)  # the one registry line, for this test only
    return ToySAE


def test_a_registered_architecture_gets_its_flag_key_sweep_key_and_range(toy, tmp_path):
    help_text = CliRunner().invoke(train_main, ["--help"]).output
    assert "--toy-setting" in help_text and "toy: Toys per feature." in " ".join(help_text.split())
    cfg = LanguageModelSAERunnerConfig.from_dict({"architecture": "toy", "toy_setting": "2"})
    assert cfg.toy_setting == 2 and cfg.sae.architecture_settings == {"toy_setting": 2}
    assert "toy_setting" in used_settings(toy) and cfg.to_dict()["toy_setting"] == 2
    check_sweep({"toy_setting": [1, 2]})
    names = [name for name, _ in grid(replace(cfg, shards=str(tmp_path)), {"toy_setting": [1, 2]})]
    assert names == ["toy_setting_1", "toy_setting_2"]
    with pytest.raises(UserError, match="toy_setting is a setting of toy"):
        check_settings_used([LanguageModelSAERunnerConfig(toy_setting=2)])
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path), "--architecture", "toy", "--toy-setting", "0"])
    assert got.exit_code == 2 and got.output.strip() == "train: error: toy_setting must be positive, got 0"
    with pytest.raises(UserError) as built:  # the same declared range checks the SAE itself
        toy(SAEConfig(4, 8), ToySettings(toy_setting=0))
    assert str(built.value) == "toy_setting must be positive, got 0"


def test_batch_wide_selection_is_the_class_attribute_data_parallel_reads(toy):
    trainer = type("Trainer", (), {"sae": toy(SAEConfig(4, 8)), "cfg": LanguageModelSAERunnerConfig(architecture="toy")})
    with pytest.raises(UserError, match="toy picks its features over the whole batch"):
        check_data_parallel(trainer, 100, 10, 2)
    trainer.sae = StandardSAE(SAEConfig(4, 8))
    check_data_parallel(trainer, 100, 10, 2)
    batch_wide = sorted(arch for arch, cls in ARCHITECTURES.items() if cls.batch_wide_selection)
    assert {"batchtopk", "matryoshka_batchtopk"} <= set(batch_wide) and "topk" not in batch_wide


def test_architecture_ranges_are_the_flags_ranges():
    for arch, cls in ARCHITECTURES.items():
        for f in fields(cls.Settings):
            if f.metadata.get("range") is None:
                continue
            bad = -1 if str(f.type).startswith("int") else -1.0
            with pytest.raises(UserError) as from_config:
                LanguageModelSAERunnerConfig(architecture=arch, **{f.name: bad})
            with pytest.raises(UserError) as from_settings:
                cls(SAEConfig(8, 32), cls.Settings(**{f.name: bad}))
            assert str(from_config.value) == str(from_settings.value), (arch, f.name)
            assert "\n" not in str(from_config.value) and f.name in str(from_config.value)


# --- declared once -----------------------------------------------------------------------------

def declarations(source: str, names: set[str]) -> list[str]:
    """Where `source` declares or defaults one of `names`: a class field, a parameter default, a
    keyword given a literal, or the name as a string literal (a key of a table of them).

    A one-word name (`k`) is also the usual name of any top-k count (evaluation's `top_k(..., k=10)`):
    for those only fields and string literals count."""
    distinct = {n for n in names if "_" in n}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            found += [f"field {s.target.id}" for s in node.body if isinstance(s, ast.AnnAssign)
                      and isinstance(s.target, ast.Name) and s.target.id in names]
        elif isinstance(node, ast.arguments):
            args = node.posonlyargs + node.args
            defaulted = args[len(args) - len(node.defaults):] + [a for a, d in zip(node.kwonlyargs, node.kw_defaults) if d]
            found += [f"default {a.arg}" for a in defaulted if a.arg in distinct]
        elif isinstance(node, ast.keyword) and node.arg in distinct and isinstance(node.value, ast.Constant) \
                and node.value.value is not None:
            found += [f"keyword {node.arg}={node.value.value!r}"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found += [f"string {node.value!r}"]
    return found


def test_the_scan_finds_each_kind_of_declaration():
    snippet = 'class C:\n    k: int = 32\ndef f(aux_k=4): g(l0_coefficient=1.0)\nX = {"l1_coefficient": 1}\n'
    assert sorted(declarations(snippet, {"k", "aux_k", "l0_coefficient", "l1_coefficient"})) == \
        ["default aux_k", "field k", "keyword l0_coefficient=1.0", "string 'l1_coefficient'"]
    assert declarations("for k, v in d.items(): cfg.k = k; f(k=cfg.k)\ndef top(x, k=10): pass\n", {"k"}) == []


def test_each_architecture_setting_is_declared_only_by_its_architecture():
    names = {f.name for cls in ARCHITECTURES.values() for f in fields(cls.Settings)}
    files = [p for p in sorted((ROOT / "train").rglob("*.py")) + sorted((ROOT / "shared").rglob("*.py"))
             if "saes" not in p.relative_to(ROOT).parts]
    assert len(files) > 10
    found = {str(p.relative_to(ROOT)): d for p in files if (d := declarations(p.read_text(), names))}
    assert found == {}


# --- docs ----------------------------------------------------------------------------------------

def test_the_docs_hold_the_generated_settings_table():
    doc = ROOT / "docs" / "train.md" if (ROOT / "docs" / "train.md").is_file() else ROOT / "README.md"
    lines = doc.read_text().splitlines()
    span = table_span(lines)
    assert span is not None, f"{doc.name} has no settings table: paste `python scripts/settings_table.py`"
    assert "\n".join(lines[span[0]:span[1]]) + "\n" == settings_table(), \
        f"{doc.name}'s settings table is stale: run `python scripts/settings_table.py --write {doc.relative_to(ROOT)}`"


def test_the_table_writer_replaces_only_the_table():
    doc = "# T\n\nintro\n\n| key | default | meaning |\n|---|---|---|\n| `lr` | 1 | OBSOLETE-ROW |\n\nafter\n"
    new = with_table(doc)
    assert new.startswith("# T\n\nintro\n\n") and new.endswith("\n\nafter\n")
    assert settings_table() in new and "OBSOLETE-ROW" not in new


def test_every_part_setting_has_a_docstring_and_every_train_key_a_help_line():
    for part in PARTS.values():
        docs = field_docs(part)
        assert [f.name for f in fields(part) if not docs.get(f.name)] == [], part.__name__
    assert all(f.metadata["help"] for f in flat_fields().values())


# --- the flat adapter over the parts -----------------------------------------------------------

PREVIOUS_CONFIG = {  # a config.json the previous (flat) version wrote, for a topk run
    "shards": "/data/d", "model_name": "gelu-2l", "hook_point": "blocks.0.hook_mlp_out", "hook_point_layer": 0,
    "d_in": None, "dataset_path": "NeelNanda/c4-tokenized-2b", "is_dataset_tokenized": True, "context_size": 128,
    "store_batch_size": 32, "n_batches_in_buffer": None, "train_batch_size": 4096, "total_training_tokens": None,
    "normalize_activations": "none", "shuffle_buffer_rows": None, "shuffle_block_rows": 16,
    "eval_holdout_contexts": None, "seed": 42, "device": None, "architecture": "topk", "expansion_factor": 64,
    "d_sae": None, "b_dec_init_method": "geometric_median", "decoder_init_norm": None, "l1_coefficient": None,
    "anthropic_april_update": None, "k": 64, "aux_k": None, "aux_loss_coefficient": None, "sparse_decode": None,
    "topk_threshold_lr": None, "matryoshka_widths": None, "l0_coefficient": None, "jumprelu_bandwidth": None,
    "jumprelu_init_threshold": None, "jumprelu_threshold_lr": None, "lr": 0.0003, "lr_scheduler_name": "constant",
    "lr_warm_up_steps": 0, "lr_decay_steps": None, "l1_warm_up_steps": None, "l0_warm_up_steps": None,
    "dtype": "float32", "autocast": False, "feature_sampling_method": None, "feature_sampling_window": 1000,
    "dead_feature_window": None, "dead_feature_threshold": None, "feature_reinit_scale": None,
    "resample_sample_rows": None, "evaluate_at_end": False, "n_checkpoints": 0, "checkpoint_path": "/runs/r",
    "run_name": None, "log_to_wandb": False, "wandb_project": "mats_sae_training_language_models",
    "wandb_entity": None, "wandb_log_frequency": 10}


ADDED_SINCE = {"target_shards": None, "skip_connection": None,  # transcoders
               "init_seed": None,  # the SAE init apart from the data order
               "target_l0": None,  # steering the sparsity coefficient toward a target L0
               "threshold_sample_rows": None,  # BatchTopK's calibrated threshold
               "clip_grad_norm": None}  # gradient clipping, as SAELens does


def test_a_previous_flat_config_round_trips_exactly():
    cfg = LanguageModelSAERunnerConfig.from_dict(json.loads(json.dumps(PREVIOUS_CONFIG)))
    # Every key as it was, plus the keys added since, at their "not given" value.
    assert cfg.to_dict() == PREVIOUS_CONFIG | ADDED_SINCE and list(cfg.to_dict()) == [f.name for f in fields(cfg)]
    assert cfg.optimizer.lr == cfg.lr == 0.0003 and cfg.sae.architecture_settings == {"k": 64}
    assert cfg.run.checkpoint_path == "/runs/r" and cfg.data.shards == "/data/d"
    moved = replace(cfg, shards="/elsewhere", k=32)
    assert (moved.shards, moved.k, cfg.shards, cfg.k) == ("/elsewhere", 32, "/data/d", 64)
    cfg.k = None  # back to the architecture's default
    assert cfg.sae.architecture_settings == {} and cfg.to_dict()["k"] is None
    assert LanguageModelSAERunnerConfig(**PREVIOUS_CONFIG) == LanguageModelSAERunnerConfig.from_dict(PREVIOUS_CONFIG)


def test_harvest_settings_are_refused_by_train_with_where_they_belong(tmp_path):
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path), "--context-size", "5"])
    assert got.exit_code == 2
    assert got.output.strip().startswith("train: error: context_size is a harvest setting: pass --context-size "
                                         "to `harvest`") and "\n" not in got.output.strip()
    conf = tmp_path / "c.yaml"
    conf.write_text("hook_point: blocks.1.hook_mlp_out\n")
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path), "--config", str(conf)])
    assert got.exit_code == 2 and "hook_point is a harvest setting" in got.output and "--hook" in got.output
    for ignored in ("--dtype", "--n-batches-in-buffer", "--is-dataset-tokenized"):
        got = CliRunner().invoke(train_main, ["--shards", str(tmp_path), ignored, "1"])
        assert got.exit_code == 2 and "No such option" in got.output, ignored
    # The Python API still takes them all (it harvests a missing dump with the harvest settings).
    cfg = LanguageModelSAERunnerConfig(context_size=5, n_batches_in_buffer=8, is_dataset_tokenized=False)
    assert (cfg.context_size, cfg.data.n_batches_in_buffer, cfg.is_dataset_tokenized) == (5, 8, False)


# --- the registry, read without torch ------------------------------------------------------------

def test_the_registry_gives_the_settings_its_classes_use(toy):
    from shared.saes.registry import settings_classes

    found = settings_classes()
    assert list(found) == list(ARCHITECTURES) and found["toy"] is ToySettings  # a class registered as is
    for arch, settings in found.items():
        assert ARCHITECTURES[arch].Settings is settings, arch


def test_a_registry_line_whose_halves_disagree_is_refused():
    from shared.saes.registry import Lazy, Registry

    registry = Registry({"odd": Lazy("shared.saes.topk:TopKSAE", "shared.saes.standard_settings:StandardSettings")})
    assert registry.settings_class("odd") is StandardSettings
    with pytest.raises(TypeError, match="odd: shared.saes.topk:TopKSAE uses TopKSettings"):
        registry["odd"]
