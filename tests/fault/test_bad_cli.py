"""Bad command-line inputs: each gets its exit code (2 for a usage error) and one line saying what
is wrong, never a traceback. Run in-process through click, as the console scripts run them."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import WORDS
from fault._support import error_line, invoke, ok
from shared.dump_writer import write_dump

# Slow tier: the fault suite (tests/README.md); the fast tier keeps a sample of its checks.
pytestmark = pytest.mark.slow


@dataclass
class Env:
    """What the table's commands point at."""

    tmp: Path
    dump: Path  # a complete synthetic dump, d_in 16
    run: Path  # an SAE trained on it, with held-out contexts to evaluate on
    model: Path  # the tiny random-weight GPT-2
    text: Path  # a good .jsonl dataset

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path


def small_dump(folder: Path, n_rows: int = 2048, d_in: int = 16, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    write_dump(folder, torch.randn(n_rows, d_in, generator=g), context_size=16, shard_rows=512)
    return folder


TRAIN = ["--expansion-factor", "2", "--train-batch-size", "64", "--total-training-tokens", "512",
         "--device", "cpu", "--eval-holdout-contexts", "8", "--quiet"]


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory, tiny_model) -> Env:
    root = tmp_path_factory.mktemp("bad_cli")
    dump = small_dump(root / "dump")
    ok("train", ["--shards", dump, "--checkpoint-path", root / "run", *TRAIN])
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(WORDS[i % len(WORDS)] for i in range(j, j + 40))}) + "\n"
                            for j in range(40)))
    return Env(root, dump, root / "run", tiny_model, text)


@pytest.fixture
def env(shared_env, tmp_path) -> Env:
    return Env(tmp_path, shared_env.dump, shared_env.run, shared_env.model, shared_env.text)


def train(*extra: str) -> Callable[[Env], list]:
    return lambda e: ["--shards", e.dump, "--checkpoint-path", e.tmp / "out", *TRAIN, *extra]


def harvest(dataset: Callable[[Env], object] | None = None, *extra: str) -> Callable[[Env], list]:
    def args(e: Env) -> list:
        ds = dataset(e) if dataset is not None else e.text
        return ["--model", e.model, "--dataset", ds, "--out", e.tmp / "out", "--context-size", "16",
                "--batch-size", "4", "--tokens", "256", "--shard-rows", "128", "--quiet", *extra]
    return args


def evaluate(*extra: str, path: Callable[[Env], object] = lambda e: e.run) -> Callable[[Env], list]:
    return lambda e: [path(e), "--no-model", *extra]


def _not_a_checkpoint(e: Env) -> Path:
    (e.tmp / "plain").mkdir()
    return e.tmp / "plain"


def _existing_file(e: Env) -> Path:
    return e.file("a_file", b"not a folder\n")


def _run_without_its_dump(e: Env) -> Path:
    """A copy of the run whose cfg.json names a dump that was deleted since."""
    dump = shutil.copytree(e.dump, e.tmp / "gone_dump")
    ok("train", ["--shards", dump, "--checkpoint-path", e.tmp / "orphan", *TRAIN])
    shutil.rmtree(dump)
    return e.tmp / "orphan"


def _config_list(e: Env) -> Path:
    return e.file("c.yaml", b"- lr\n- 0.1\n")


def pending(reason: str):
    """An entry that fails until the named fix of issue 10 lands (strict: an XPASS fails)."""
    return pytest.mark.xfail(strict=True, reason=f"issue 10: {reason}")


# (program, arguments, exit code, fragment of the one error line)
CASES = [
    # ---- train: settings out of range (usage errors, before any work) --------------------------
    pytest.param("train", train("--lr", "inf"), 2, "lr", id="train-lr-inf"),
    pytest.param("train", train("--lr", "0"), 2, "lr", id="train-lr-0"),
    pytest.param("train", train("--lr", "-0.001"), 2, "lr", id="train-lr-negative"),
    pytest.param("train", train("--l1-coefficient", "nan"), 2, "l1_coefficient", id="train-l1-nan"),
    pytest.param("train", train("--l1-coefficient", "-1"), 2, "l1_coefficient", id="train-l1-negative"),
    pytest.param("train", train("--d-sae", "1"), 2, "d_sae", id="train-d-sae-1"),
    pytest.param("train", train("--d-sae", "0"), 2, "d_sae", id="train-d-sae-0"),
    pytest.param("train", train("--train-batch-size", "0"), 2, "train_batch_size must be positive",
                 id="train-batch-0"),
    pytest.param("train", train("--expansion-factor", "-2"), 2, "expansion_factor must be positive",
                 id="train-expansion-negative"),
    pytest.param("train", train("--total-training-tokens", "-5"), 2, "total_training_tokens",
                 id="train-tokens-negative"),
    pytest.param("train", train("--lr", "abc"), 2, "'abc' is not a valid float", id="train-lr-not-a-number"),
    pytest.param("train", train("--lr-scheduler-name", "warp"), 2, "lr_scheduler_name must be one of",
                 id="train-unknown-scheduler"),
    pytest.param("train", train("--architecture", "magic"), 2, "architecture", id="train-unknown-architecture"),
    pytest.param("train", train("--d-in", "33"), 2, "does not match the dump's d_in 16", id="train-d-in-mismatch"),
    # ---- train: where it reads and writes ------------------------------------------------------
    pytest.param("train", lambda e: [*train()(e), "--checkpoint-path", _existing_file(e)], 2, "a_file",
                 id="train-checkpoint-path-is-a-file"),
    pytest.param("train", lambda e: [*train()(e), "--checkpoint-path", e.dump], 2, "dump",
                 id="train-checkpoint-path-is-the-dump"),
    pytest.param("train", lambda e: ["--shards", e.tmp / "no_dump", *TRAIN], 2, "does not exist",
                 id="train-missing-dump"),
    pytest.param("train", lambda e: ["--shards", _not_a_checkpoint(e), *TRAIN], 2, "not a dump",
                 id="train-folder-not-a-dump"),
    pytest.param("train", lambda e: TRAIN, 2, "--shards", id="train-no-dump-given"),
    pytest.param("train", lambda e: ["--resume-from", _not_a_checkpoint(e), "--quiet"], 2, "not a checkpoint",
                 id="train-resume-from-not-a-checkpoint"),
    pytest.param("train", lambda e: ["--resume-from", e.tmp / "nowhere"], 2, "does not exist",
                 id="train-resume-from-missing"),
    pytest.param("train", lambda e: [*train()(e), "--config", _config_list(e)], 2, "mapping",
                 id="train-config-not-a-mapping"),
    pytest.param("train", train("--sweep", "l1_coefficient"), 2, "KEY=V1,V2", id="train-sweep-malformed"),
    pytest.param("train", train("--sweep", "train_batch_size=64,128"), 2, "share one data stream",
                 id="train-sweep-data-setting"),
    pytest.param("train", train("--sweep", "warp_speed=1,2"), 2, "unknown key 'warp_speed'",
                 id="train-sweep-unknown-key"),
    # ---- harvest ---------------------------------------------------------------------------------
    pytest.param("harvest", harvest(None, "--context-size", "1"), 2, "--context-size", id="harvest-context-size-1"),
    pytest.param("harvest", harvest(None, "--context-size", "1000"), 2, "n_ctx", id="harvest-context-above-n-ctx"),
    pytest.param("harvest", harvest(None, "--tokens", "0"), 2, "tokens must be positive", id="harvest-tokens-0"),
    pytest.param("harvest", harvest(lambda e: e.file("empty.jsonl", b"")), 2, "empty.jsonl",
                 id="harvest-empty-jsonl"),
    pytest.param("harvest", harvest(lambda e: e.file("latin1.txt", "café naïve déjà vu\n".encode("latin-1") * 50)),
                 2, "UTF-8", id="harvest-non-utf8-txt"),
    pytest.param("harvest", harvest(lambda e: e.file("blank.txt", b"   \n\n \t \n" * 20)), 2, "whitespace",
                 id="harvest-whitespace-only-txt"),
    pytest.param("harvest", harvest(lambda e: e.file("blank.jsonl", b'{"text": "   "}\n' * 20)), 2, "whitespace",
                 id="harvest-whitespace-only-jsonl"),
    pytest.param("harvest", harvest(lambda e: e.file("other.jsonl", b'{"body": "the cat"}\n' * 20)), 2,
                 "--text-column", id="harvest-no-text-column"),
    pytest.param("harvest", harvest(None, "--hook", "blocks.0.hook_mlp_outt"), 2, "unknown hook",
                 id="harvest-unknown-hook"),
    pytest.param("harvest", harvest(None, "--tokens", "1000000"), 2, "--tokens", id="harvest-too-few-tokens"),
    pytest.param("harvest", harvest(None, "--hook", "blocks.0.hook_mlp_in"), 2, "blocks.0.mlp.hook_in",
                 id="harvest-gated-off-hook"),
    pytest.param("harvest", harvest(None, "--mlp-pairs", "one"), 2, "not a layer spec", id="harvest-mlp-pairs-bad"),
    pytest.param("harvest", harvest(None, "--mlp-pairs", "2..0"), 2, "write 0..2", id="harvest-mlp-pairs-backwards"),
    pytest.param("harvest", harvest(None, "--mlp-pairs", "0..2"), 2, "the model has 2 layers",
                 id="harvest-mlp-pairs-past-the-last-layer"),
    pytest.param("harvest", harvest(None, "--mlp-pairs-input", "resid-mid"), 2, "--mlp-pairs LAYERS",
                 id="harvest-mlp-pairs-input-alone"),
    pytest.param("harvest", harvest(None, "--compression", "zstd"), 2, "--format zarr",
                 id="harvest-compression-without-zarr"),
    pytest.param("harvest", lambda e: [*harvest()(e), "--out", _existing_file(e)], 2, "is a file",
                 id="harvest-out-is-a-file"),
    pytest.param("harvest", lambda e: [*harvest()(e), "--out", e.dump], 2, "different dump",
                 id="harvest-out-holds-another-dump"),
    pytest.param("harvest", harvest(None, "--batch-size", "-1"), 2, "batch-size must be positive",
                 id="harvest-batch-size-negative"),
    # ---- evaluate --------------------------------------------------------------------------------
    pytest.param("evaluate", evaluate("--top-examples", "-1", "--features", "0"), 2, "--top-examples",
                 id="evaluate-top-examples-negative"),
    pytest.param("evaluate", evaluate("--top-examples", "2", "--features", "a,b"), 2, "--features",
                 id="evaluate-features-not-integers"),
    pytest.param("evaluate", evaluate("--top-examples", "2", "--features", "999"), 2, "out of range",
                 id="evaluate-feature-out-of-range"),
    pytest.param("evaluate", evaluate("--top-examples", "2"), 2, "--features", id="evaluate-top-examples-no-features"),
    pytest.param("evaluate", evaluate("--max-eval-contexts", "0"), 2, "--max-eval-contexts",
                 id="evaluate-max-eval-contexts-0"),
    pytest.param("evaluate", evaluate(path=_run_without_its_dump), 2, "gone_dump", id="evaluate-dump-deleted"),
    pytest.param("evaluate", lambda e: [e.run, "--no-model", "--shards", e.tmp / "no_dump"], 2, "does not exist",
                 id="evaluate-shards-missing"),
    pytest.param("evaluate", evaluate(path=_not_a_checkpoint), 2, "not an SAE checkpoint",
                 id="evaluate-not-a-run"),
    pytest.param("evaluate", lambda e: [e.tmp / "nowhere"], 2, "does not exist", id="evaluate-path-missing"),
]


@pytest.mark.parametrize("prog, args, code, fragment", CASES)
def test_bad_input_gets_one_line_error(env, prog, args, code, fragment):
    got = invoke(prog, args(env))
    line = error_line(got, strict=False)  # harvest says which dataset it opened before refusing
    assert got.code == code, f"exit {got.code}, expected {code}\n" + got.describe()
    assert fragment in line, f"'{fragment}' not in the error line\n" + got.describe()
    # A refused training leaves no SAE behind, a refused harvest nothing that looks complete.
    assert not (env.tmp / "out" / "final").exists()
    manifest = env.tmp / "out" / "manifest.json"
    assert not manifest.is_file() or not json.loads(manifest.read_text())["complete"]
