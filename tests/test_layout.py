"""The stage boundary, `harvest -> shared <- train`: `harvest` and `train` never import each
other, and `shared` imports neither.

Checked on the source with `ast`, without importing anything, so that an import inside a function
counts as much as one at the top. Running `python -m harvest` in a subprocess is not an import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
FORBIDDEN = {"harvest": ("train",), "train": ("harvest",), "shared": ("harvest", "train")}
"""package -> the packages it must not import."""


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository: train/evaluation/cli.py -> train.evaluation.cli."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every module `source` (the text of module `module`) imports, relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from .. import x` names the package it leaves: level 1 is this package itself.
            base = package[: max(0, len(package) - (node.level - 1))] if node.level else []
            if node.module:
                found.append(".".join(base + [node.module]))
            else:  # `from .. import harvest`: each name is a module of `base`
                found += [".".join(base + [alias.name]) for alias in node.names]
    return found


def crossings(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports in `source` that cross the boundary: harvest importing train, train importing
    harvest, shared importing either."""
    others = FORBIDDEN.get(module.split(".")[0], ())
    return [m for m in imported_modules(source, module, is_package)
            if any(m == o or m.startswith(o + ".") for o in others)]


def test_no_module_crosses_the_stage_boundary():
    checked, bad = 0, []
    for package in FORBIDDEN:
        for path in sorted((REPO / package).rglob("*.py")):
            checked += 1
            name = module_name(path)
            for target in crossings(path.read_text(), name, path.name == "__init__.py"):
                bad.append(f"{path.relative_to(REPO)} imports {target}")
    assert checked > 30  # the three packages were found and read
    assert not bad, "harvest -> shared <- train: code both stages need goes into shared/:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("harvest.run", "import train"),
    ("harvest.run", "import train.loader as loader"),
    ("harvest.run", "from train.loader import background"),
    ("harvest.run", "from train import loader"),
    ("harvest.run", "def f():\n    from train.distributed import agree\n"),
    ("train.distributed", "from harvest.distributed import Ranks"),
    ("train.evaluation.cli", "from ...harvest import run"),
    ("train.evaluation.cli", "from ... import harvest"),
    ("shared.reader", "from train.loader import ActivationLoader"),
    ("shared.saes.io", "from ...harvest.config import HarvestConfig"),
])
def test_a_planted_crossing_is_found(module, source):
    assert crossings(source, module) != []


@pytest.mark.parametrize("module, source", [
    ("harvest.run", "from shared.process_group import Ranks"),
    ("harvest.run", "from . import writer\nfrom .contexts import pack_contexts"),
    ("harvest.run", "import trainer_tools\nfrom harvesting import x"),  # names that only start alike
    ("train.api", "import subprocess\nsubprocess.run(['python', '-m', 'harvest'])"),
    ("train.evaluation.cli", "from .. import loader\nfrom ..evaluation import metrics"),
])
def test_allowed_imports_pass(module, source):
    assert crossings(source, module) == []


def test_relative_imports_resolve_against_the_package():
    assert imported_modules("from .. import loader", "train.evaluation.cli") == ["train.loader"]
    assert imported_modules("from .writer import ShardWriter", "harvest", is_package=True) == ["harvest.writer"]
    assert imported_modules("from ..train import x", "harvest.run") == ["train"]
