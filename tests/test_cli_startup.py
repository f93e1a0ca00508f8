"""`harvest --help`, `train --help` and `evaluate --help` answer without importing the model stack:
torch and the libraries over it load only when a command runs (a newcomer's first command on a
busy machine took 16-40 s for its help)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "transformer_lens", "datasets", "zarr", "numpy", "wandb", "matplotlib",
         "safetensors", "huggingface_hub", "tqdm", "yaml"}
COMMANDS = {"harvest": "harvest", "train": "train", "evaluate": "train.evaluation.cli"}
"""Each command's module (the console script `evaluate` calls `train.evaluation.cli:main`)."""
STARTS = {"harvest": ["-m", "harvest"], "train": ["-m", "train"],
          "evaluate": ["-c", "from train.evaluation.cli import main; main()"]}


def module_file(name: str) -> Path | None:
    """The repository file of module `name`, None for a module from elsewhere."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_time_imports(path: Path, name: str) -> set[str]:
    """The modules `path` (module `name`) imports when it is imported: its module-level imports,
    not those inside functions or under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            body += node.orelse
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += [n for block in ("body", "orelse", "finalbody", "handlers") for n in getattr(node, block, [])]
        elif isinstance(node, ast.ExceptHandler):
            body += node.body
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return found | parents  # importing a.b.c imports a and a.b first


def imported_at_startup(entry: str) -> set[str]:
    """Every module importing `entry` (and so `python -m entry`'s start) imports: the repository's
    modules followed, the others' top-level names collected."""
    seen: set[str] = set()
    outside: set[str] = set()
    todo = [".".join(entry.split(".")[:i]) for i in range(1, entry.count(".") + 2)]  # its packages first
    todo += [f"{entry}.__main__"] if module_file(f"{entry}.__main__") else []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            outside.add(name.split(".")[0])
            continue
        todo += sorted(import_time_imports(path, name))
    return outside


def test_the_scan_sees_module_level_imports_only(tmp_path):
    source = ("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
              "try:\n    import numpy\nexcept ImportError:\n    pass\ndef f():\n    import zarr\n")
    path = tmp_path / "m.py"
    path.write_text(source)
    assert import_time_imports(path, "m") == {"os", "typing", "numpy"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_starting_a_command_imports_nothing_heavy(command):
    outside = imported_at_startup(COMMANDS[command])
    assert "click" in outside  # the scan reached the command's module
    assert outside & HEAVY == set()


@pytest.mark.slow  # three interpreters
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_runs_without_the_model_stack(command):
    """The real command: `python -X importtime` lists every module the interpreter imported."""
    got = subprocess.run([sys.executable, "-X", "importtime", *STARTS[command], "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "--help" in got.stdout and "Usage:" in got.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in got.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "click" in imported and imported & HEAVY == set()
