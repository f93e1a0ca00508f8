"""`pass_id`: one identifier per harvest pass, in the manifest of every hook it wrote, kept by --resume."""
from __future__ import annotations

import json
import re
from pathlib import Path


import harvest.writer
from helpers import dump_files, pass_id, run_harvest

HOOKS = ("blocks.0.hook_mlp_out", "blocks.1.hook_resid_post")


def _args(model: Path, ds: Path, out: Path, *hooks: str) -> list[str]:
    # 32 contexts of 32 rows in shards of 300 rows: 4 shards per hook.
    return ["--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size", "32",
            "--batch-size", "5", "--tokens", "1000", "--shard-rows", "300",
            *(a for h in hooks for a in ("--hook", h))]


def _interrupted(model: Path, ds: Path, out: Path, monkeypatch) -> None:
    """A two-hook harvest that stops with shards 0 and 1 of each hook written (shard 2 fails)."""
    real_write = harvest.writer.ShardWriter._write

    def failing_write(self, buf):
        if buf.index >= 2:
            raise OSError("simulated crash")
        real_write(self, buf)

    monkeypatch.setattr(harvest.writer.ShardWriter, "_write", failing_write)
    crashed = run_harvest(*_args(model, ds, out, *HOOKS), expect_ok=False)
    monkeypatch.undo()
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    for h in HOOKS:
        m = json.loads((out / h / "manifest.json").read_text())
        assert not m["complete"] and len(m["shards"]) == 2


def _set_pass_ids(out: Path, ids: dict[str, str | None]) -> None:
    for h, value in ids.items():
        path = out / h / "manifest.json"
        m = json.loads(path.read_text())
        if value is None:
            m.pop("pass_id")  # as written before the field existed
        else:
            m["pass_id"] = value
        path.write_text(json.dumps(m))


def test_every_hook_of_one_harvest_shares_one_fresh_pass_id(tiny_model, token_dataset, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_harvest(*_args(tiny_model, token_dataset, first, *HOOKS))
    run_harvest(*_args(tiny_model, token_dataset, second, *HOOKS))
    ids = {pass_id(first / h) for h in HOOKS}
    assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids.pop() or "")
    # Another harvest, same settings, same rows: another pass.
    assert pass_id(second / HOOKS[0]) == pass_id(second / HOOKS[1]) != pass_id(first / HOOKS[0])
    assert dump_files(first / HOOKS[0]) == dump_files(second / HOOKS[0])


def test_resume_keeps_the_pass_id_of_every_hook(tiny_model, token_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(tiny_model, token_dataset, out, monkeypatch)
    before = pass_id(out / HOOKS[0])
    assert before and pass_id(out / HOOKS[1]) == before
    run_harvest(*_args(tiny_model, token_dataset, out, *HOOKS), "--resume")
    assert [pass_id(out / h) for h in HOOKS] == [before, before]
    assert all(json.loads((out / h / "manifest.json").read_text())["complete"] for h in HOOKS)


def test_a_hook_resumed_without_a_pass_id_adopts_the_passes(tiny_model, token_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(tiny_model, token_dataset, out, monkeypatch)
    kept = pass_id(out / HOOKS[1])
    _set_pass_ids(out, {HOOKS[0]: None})
    run_harvest(*_args(tiny_model, token_dataset, out, *HOOKS), "--resume")
    assert [pass_id(out / h) for h in HOOKS] == [kept, kept]


def test_dumps_written_before_pass_id_get_one_fresh_id_on_resume(tiny_model, token_dataset, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "out"
    _interrupted(tiny_model, token_dataset, out, monkeypatch)
    old = pass_id(out / HOOKS[0])
    _set_pass_ids(out, {h: None for h in HOOKS})
    run_harvest(*_args(tiny_model, token_dataset, out, *HOOKS), "--resume")
    ids = {pass_id(out / h) for h in HOOKS}
    assert len(ids) == 1 and None not in ids and old not in ids


def test_resuming_dumps_of_different_passes_together_is_refused(tiny_model, token_dataset, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "out"
    _interrupted(tiny_model, token_dataset, out, monkeypatch)
    _set_pass_ids(out, {HOOKS[0]: "a" * 32, HOOKS[1]: "b" * 32})
    refused = run_harvest(*_args(tiny_model, token_dataset, out, *HOOKS), "--resume", expect_ok=False)
    assert refused.exit_code == 2
    lines = [line for line in refused.output.splitlines() if line.startswith("harvest: error:")]
    assert len(lines) == 1 and "different harvests" in lines[0] and "--overwrite" in lines[0], refused.output
    # Nothing was written: each dump still holds its own pass and its two shards.
    for h, want in zip(HOOKS, ("a" * 32, "b" * 32)):
        m = json.loads((out / h / "manifest.json").read_text())
        assert m["pass_id"] == want and len(m["shards"]) == 2


def test_a_harvest_that_does_nothing_leaves_the_pass_id(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "out"
    run_harvest(*_args(tiny_model, token_dataset, out, HOOKS[0]))
    before = pass_id(out)
    again = run_harvest(*_args(tiny_model, token_dataset, out, HOOKS[0]))
    assert "nothing to do" in again.output and pass_id(out) == before
