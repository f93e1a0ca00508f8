"""Fixtures of the fault suite, and its summary: what was tried and how the tools answered."""
from __future__ import annotations

import json

import pytest
import torch

from fault._support import SEED, TALLY

# Test module -> the table its entries are counted in.
TABLES = {"test_corruption": "corruptions", "test_run_corruption": "run_folder_corruptions",
          "test_bad_cli": "bad_inputs", "test_disk_full": "disk_full",
          "test_run_ownership": "run_folder_ownership", "test_run_symlinks": "run_folder_symlinks",
          "test_data_identity": "data_identity", "test_dump_symlinks": "dump_symlinks",
          "test_state_corruption": "trainer_state", "test_eval_refusals": "evaluate_refusals",
          "test_disk_full_saves": "disk_full_saves", "test_interrupts": "interrupts",
          "test_storage_waits": "storage_waits"}
_LABELS = {"corruptions": "refused", "run_folder_corruptions": "refused", "bad_inputs": "one-line errors",
           "disk_full": "one-line error, then resumed identical",
           "kill_windows": "resumed or told to restart in one line",
           "run_folder_ownership": "refused in one line, nothing changed",
           "run_folder_symlinks": "refused by name in one line, nothing changed",
           "data_identity": "refused", "dump_symlinks": "refused, naming what the entry is",
           "trainer_state": "refused", "evaluate_refusals": "refused",
           "disk_full_saves": "one line, nothing half-written left",
           "interrupts": "one line and exit 130, no traceback",
           "storage_waits": "said while waiting, then one line naming the bound"}


def table_of(item) -> str | None:
    module = item.module.__name__.rpartition(".")[2] if item.module else ""
    if module == "test_kills":  # the loops tally their own kills; the fixed windows are entries
        return None if "_anywhere_" in item.name else "kill_windows"
    return TABLES.get(module)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process():
    """Tiny tensors everywhere: one thread is as fast and does not fight the other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    table = table_of(item)
    if table is None:
        return
    name = item.callspec.id if hasattr(item, "callspec") else item.name
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        if hasattr(report, "wasxfail") and report.outcome == "skipped":
            TALLY.entry(table, name, "xfail")
        elif report.outcome == "passed":
            TALLY.entry(table, name, "ok")
        elif report.outcome == "failed":
            TALLY.entry(table, name, "failed")


def summary_lines(summary: dict) -> list[str]:
    lines = []
    kills = summary.get("kills")
    if kills:
        tools = ", ".join(f"{tool} {row['tried']}" for tool, row in kills["by_tool"].items())
        lines.append(f"kills: {kills['tried']} tried ({tools}); {kills['identical']} resumed identical, "
                     f"{kills['restart']} told to restart (then identical), {kills['failed']} failed")
    for table, label in _LABELS.items():
        row = summary.get(table)
        if row:
            lines.append(f"{table.replace('_', ' ')}: {row['tried']} tried; {row['ok']} {label}, "
                         f"{row['xfail']} xfail (known: see -rx reasons), {row['failed']} failed")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = TALLY.summary()
    if not summary:
        return
    terminalreporter.section("fault suite")
    for line in summary_lines(summary):
        terminalreporter.write_line(line)
    record = {"seed": SEED, "summary": summary, "kills": TALLY.kills, "entries": TALLY.entries}
    if getattr(config, "cache", None) is not None:
        config.cache.set("fault/counts", record)
        path = config.cache.mkdir("fault") / "counts.json"
    else:
        import tempfile
        from pathlib import Path

        path = Path(tempfile.gettempdir()) / "fault_counts.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    terminalreporter.write_line(f"counts written to {path}")
