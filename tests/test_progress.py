"""Every long phase of harvest, train and evaluate says so on stderr (silenced by --quiet), every
printed mse names its space, `final SAE` appears once, and scripts/timestamped.py stamps lines."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_token_dataset
from harvest.cli import main as harvest_main
from train.cli import main as train_main
from train.evaluation.cli import main as evaluate_main

pytestmark = pytest.mark.usefixtures("one_thread_module")

ROOT = Path(__file__).resolve().parents[1]


def _load_timestamped():
    spec = importlib.util.spec_from_file_location("timestamped", ROOT / "scripts" / "timestamped.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["timestamped"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


timestamped = _load_timestamped()


# ---- scripts/timestamped.py ------------------------------------------------------------------
class Chunks:
    """A stream handing out given chunks, one per read, and a clock that ticks once per read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.reads = list(chunks), 0

    def read1(self, size: int) -> bytes:
        self.reads += 1
        return self.chunks.pop(0) if self.chunks else b""

    def clock(self) -> float:
        return float(self.reads)


def test_split_lines_treats_carriage_returns_as_lines():
    got: list[tuple[float, str]] = []
    stream = Chunks([b"one\ntrain 10%\rtrain 50%\rtrain 100%\r\nlast"])
    timestamped.split_lines(stream, lambda at, line: got.append((at, line)), stream.clock)
    assert [line for _, line in got] == ["one", "train 10%", "train 50%", "train 100%", "last"]


def test_a_line_is_stamped_when_its_first_byte_arrives():
    # tqdm writes "\r" before each redraw: "bar 0%" is on screen from read 2, though only the
    # "\r" of read 4 ends it; "half" of read 3 continues it.
    got: list[tuple[float, str]] = []
    stream = Chunks([b"start\n", b"bar 0%", b" half", b"\rbar 100%\n"])
    timestamped.split_lines(stream, lambda at, line: got.append((at, line)), stream.clock)
    assert got == [(1.0, "start"), (2.0, "bar 0% half"), (4.0, "bar 100%")]


def test_longest_gap_is_measured_between_outputs_and_to_the_end():
    t = timestamped.Timeline(start=0.0)
    t.lines = [(0.5, "a"), (1.0, "b"), (4.0, "c"), (4.5, "d")]
    assert t.longest_gap(end=5.0) == (3.0, 2)  # b -> c, the gap before line index 2
    assert t.longest_gap(end=9.0) == (4.5, 4)  # after d, until the command ended
    t.lines = []
    assert t.longest_gap(end=2.0) == (2.0, 0)  # a silent command: one gap, start to end


def test_run_stamps_both_streams_and_reports_the_gap_and_status():
    out, err = io.StringIO(), io.StringIO()
    code = "import sys; print('hello'); sys.stderr.write('bar 1\\rbar 2\\r'); sys.exit(3)"
    status = timestamped.run([sys.executable, "-c", code], out=out, err=err)
    assert status == 3
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["hello"]
    err_lines = err.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in err_lines[:-1]] == ["bar 1", "bar 2"]
    assert all(line.startswith("[") and float(line[1:line.index("]")]) >= 0 for line in err_lines[:-1])
    assert err_lines[-1].startswith("longest gap: ") and "3 lines" in err_lines[-1]  # hello, bar 1, bar 2
    assert err_lines[-1].endswith("exit status 3")


# ---- the three commands ----------------------------------------------------------------------
def _in_order(text: str, needles: list[str]) -> None:
    """Each needle appears in `text`, after the previous one."""
    at = 0
    for needle in needles:
        found = text.find(needle, at)
        assert found >= 0, f"{needle!r} missing (after position {at}) in:\n{text}"
        at = found + len(needle)


# A harvest with the model, a training and four evaluations: about 10 s, so the slow tier.
slow_pipeline = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model, vocab_size):
    """A tiny harvest, train (normalised) and evaluate, with progress shown; each result kept."""
    root = tmp_path_factory.mktemp("progress")
    ds = write_token_dataset(root / "ds", n_docs=40, doc_len=100, vocab=vocab_size)
    dump, run = root / "dump", root / "run"
    runner = CliRunner()
    harvested = runner.invoke(harvest_main, ["--model", str(tiny_model), "--dataset", str(ds), "--out", str(dump),
                                             "--hook", "blocks.0.hook_mlp_out", "--context-size", "32",
                                             "--batch-size", "5", "--tokens", "4000", "--device", "cpu"])
    assert harvested.exit_code == 0, harvested.output
    trained = runner.invoke(train_main, ["--shards", str(dump), "--checkpoint-path", str(run), "--device", "cpu",
                                         "--expansion-factor", "2", "--train-batch-size", "128",
                                         "--normalize-activations", "expected_norm", "--wandb-log-frequency", "5",
                                         "--eval-holdout-contexts", "8", "--feature-sampling-window", "10",
                                         "--dead-feature-window", "5", "--resample-sample-rows", "512"])
    assert trained.exit_code == 0, trained.output
    evaluated = runner.invoke(evaluate_main, [str(run), "--max-eval-contexts", "4", "--batch-contexts", "2",
                                              "--dashboard"])
    assert evaluated.exit_code == 0, evaluated.output
    top = runner.invoke(evaluate_main, [str(run), "--top-examples", "2", "--features", "0,1"])
    assert top.exit_code == 0, top.output
    return dict(dump=dump, run=run, harvested=harvested, trained=trained, evaluated=evaluated, top=top)


@slow_pipeline
def test_harvest_announces_the_model_and_counts_bytes_as_rows_arrive(pipeline):
    err = pipeline["harvested"].stderr
    _in_order(err, ["loading model", "harvest", "of activations (", "on disk)"])
    # 4,000 tokens of width 32 float32 (+16 bytes of indices a row) in one shard: the bar's last
    # text counts every byte, though the single shard is written only after the last batch.
    last = [line for line in err.replace("\r", "\n").splitlines() if "of activations" in line][-1]
    assert "0 bytes of activations" not in last and "KB of activations" in last


@slow_pipeline
def test_train_shows_the_checksums_the_loop_and_the_mse_space_once(pipeline):
    got = pipeline["trained"]
    _in_order(got.stderr, ["verify dump", "train", "mse ", " normalised (", " raw)"])
    final = str(pipeline["run"] / "final")
    assert got.output.count(final) == 1  # the path on stdout, for scripts; not also in a log line
    assert got.stdout.strip().splitlines()[-1] == final


@slow_pipeline
def test_metrics_log_has_mse_in_both_spaces(pipeline):
    dump_stats = json.loads((pipeline["dump"] / "manifest.json").read_text())["stats"]
    d_in = json.loads((pipeline["dump"] / "manifest.json").read_text())["d_in"]
    scale = math.sqrt(d_in) / (dump_stats.get("mean_norm") or math.sqrt(dump_stats["mean_sq_norm"]))
    rows = [json.loads(line) for line in (pipeline["run"] / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "mse" in r]
    assert rows and scale != pytest.approx(1.0)
    for r in rows:
        assert r["mse_raw"] == pytest.approx(r["mse"] / scale ** 2, rel=1e-6)


@slow_pipeline
def test_evaluate_shows_each_pass_and_names_its_units(pipeline):
    got = pipeline["evaluated"]
    _in_order(got.stderr, ["verify dump", "loading model", "held-out rows", "CE with the SAE spliced in: 100%",
                           "8/8", "features of run", "nearest features and logit table of 64 features ...",
                           "writing the pages of 64 features"])
    ev = json.loads((pipeline["run"] / "eval.json").read_text())
    assert ev["units"] == "raw activations"
    assert f"mse {ev['mse']:.4g} raw," in got.stdout


@slow_pipeline
def test_top_examples_shows_its_pass(pipeline):
    got = pipeline["top"]
    _in_order(got.stderr, ["verify dump", "top examples"])
    assert "feature 0:" in got.stdout


@slow_pipeline
def test_quiet_silences_every_progress_line(pipeline, tmp_path):
    run = pipeline["run"]
    runner = CliRunner()
    ev = runner.invoke(evaluate_main, [str(run), "--quiet", "--max-eval-contexts", "2", "--batch-contexts", "2",
                                       "--dashboard"])
    top = runner.invoke(evaluate_main, [str(run), "--quiet", "--top-examples", "1", "--features", "0"])
    trained = runner.invoke(train_main, ["--shards", str(pipeline["dump"]), "--checkpoint-path", str(tmp_path / "r"),
                                         "--device", "cpu", "--quiet", "--expansion-factor", "2",
                                         "--train-batch-size", "128", "--total-training-tokens", "256",
                                         "--eval-holdout-contexts", "8"])
    for got in (ev, top, trained):
        assert got.exit_code == 0, got.output
        for needle in ("verify", "loading model", "held-out rows", "CE with", "top examples", "features of",
                       "nearest features", "writing the pages", "geometric median", "%|"):
            assert needle not in got.stderr, (needle, got.stderr)


# ---- the bars one by one, without a model (fast) ----------------------------------------------
def _tiny_dump(folder: Path, n_rows: int = 600, shard_rows: int = 200, fmt: str = "safetensors") -> Path:
    import torch

    from shared.dump_writer import write_dump

    acts = torch.randn(n_rows, 8, generator=torch.Generator().manual_seed(0))
    write_dump(folder, acts, context_size=20, shard_rows=shard_rows, fmt=fmt)
    return folder


@pytest.mark.parametrize("progress", [True, False])
def test_verify_bar_counts_rows_of_every_shard(tmp_path, capsys, progress):
    from shared.reader import open_dump

    open_dump(_tiny_dump(tmp_path / "d"), verify=True, progress=progress)
    err = capsys.readouterr().err
    assert ("verify d: 100%" in err and "600/600" in err) is progress
    assert (err == "") is not progress


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_checksum_reports_fractions_up_to_the_whole_shard(tmp_path, fmt):
    from shared.manifest import read_manifest
    from shared.shard_files import checksum

    folder = _tiny_dump(tmp_path / "d", shard_rows=600, fmt=fmt)
    entry = read_manifest(folder).shards[0]
    seen: list[float] = []
    assert checksum(folder / entry.file, fmt, seen.append) == checksum(folder / entry.file, fmt) == entry.checksum
    assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("progress", [True, False])
def test_reconstruction_and_top_examples_bars(tmp_path, capsys, progress):
    from shared.reader import open_dump
    from shared.sae import SAEConfig, SparseAutoencoder
    from train.evaluation.examples import top_examples
    from train.evaluation.reconstruction import reconstruction_metrics

    dump = open_dump(_tiny_dump(tmp_path / "d"))
    sae = SparseAutoencoder(SAEConfig(8, 16))
    reconstruction_metrics(sae, dump, (100, 600), "cpu", chunk_rows=128, progress=progress)
    top_examples(sae, dump, [0], 2, chunk_rows=128, progress=progress)
    err = capsys.readouterr().err
    assert ("held-out rows: 100%" in err and "500/500" in err) is progress
    assert ("top examples: 100%" in err and "600/600" in err) is progress
    assert (err == "") is not progress


def test_harvest_bar_text_counts_buffered_bytes():
    from types import SimpleNamespace

    from harvest.forward import dump_progress

    writers = [SimpleNamespace(bytes_taken=3_000_000, bytes_written=0),
               SimpleNamespace(bytes_taken=500_000, bytes_written=500_000)]
    assert dump_progress(writers) == "3.50 MB of activations (500.00 KB on disk)"


def test_units_words():
    from train.units import metrics_line, raw_mse, training_mse_text

    assert raw_mse(8.0, 2.0) == 2.0
    assert training_mse_text({"mse": 8.0, "mse_raw": 2.0}, "expected_norm") == "mse 8 normalised (2 raw)"
    assert training_mse_text({"mse": 2.0, "mse_raw": 2.0}, "none") == "mse 2 raw"
    assert metrics_line({"mse": 2.0, "l0": 3.0, "ce_loss_recovered": None, "kl_clean_sae": 0.5},
                        ("mse", "l0", "ce_loss_recovered", "kl_clean_sae")) == "mse 2 raw, l0 3, kl_clean_sae 0.5 nats"


def test_train_says_when_it_computes_b_dec_and_resamples(tmp_path, capsys, monkeypatch):
    import torch

    from train.config import LanguageModelSAERunnerConfig
    from train.run import train
    from train.sae_trainer import SAETrainer

    dump = _tiny_dump(tmp_path / "d", n_rows=1000, shard_rows=1000)
    # Every feature counts as dead: each window's end resamples, from rows sampled from the dump.
    monkeypatch.setattr(SAETrainer, "dead_mask", lambda self: torch.ones(self.sae.cfg.d_sae, dtype=torch.bool))
    cfg = LanguageModelSAERunnerConfig(shards=str(dump), checkpoint_path=str(tmp_path / "run"), device="cpu",
                                       expansion_factor=2, train_batch_size=100, feature_sampling_window=4,
                                       dead_feature_window=2, resample_sample_rows=300,
                                       eval_holdout_contexts=0, wandb_log_frequency=2)
    train(cfg, log=lambda s: None, progress=True)
    err = capsys.readouterr().err
    _in_order(err, ["verify d", "b_dec of ", "geometric median of 1,000 training rows ...",
                    "resampling dead features from 300 rows ...", "train: 100%"])
    assert "mse " in err and " raw" in err and "normalised" not in err  # normalize_activations none
    train(replace_run(cfg, tmp_path / "quiet"), log=lambda s: None, progress=False)
    assert capsys.readouterr().err == ""


def replace_run(cfg, folder: Path):
    from dataclasses import replace

    return replace(cfg, checkpoint_path=str(folder))


def test_still_says_the_work_goes_on_until_the_block_ends(monkeypatch, capsys):
    """`still` prints one line per beat while its block runs and none after it, and nothing when
    disabled. The beats come from a fake event (two beats, then it waits for the block's end), so
    nothing here depends on the clock."""
    import threading

    from shared import progress

    class TwoBeats:
        def __init__(self):
            self.real, self.beats = threading.Event(), 2

        def wait(self, timeout):
            if self.beats:
                self.beats -= 1
                return False
            return self.real.wait()

        def set(self):
            self.real.set()

    monkeypatch.setattr(progress, "_Event", TwoBeats)
    with progress.still("unpacking a model", True):
        pass
    err = capsys.readouterr().err
    assert err.count("still unpacking a model") == 2, err
    with progress.still("loading", False):
        pass
    assert capsys.readouterr().err == ""
