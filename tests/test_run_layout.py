"""The run folder's layout has one owner, and the `train` package imports without cycles.

Both are read from the source with `ast`: a file name of a run folder may appear as a string
constant only in the module that owns it (docstrings and comments do not count), and no chain of
imports (at module level or inside a function) leads from a module back to itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "shared", "harvest")
LAYOUT = "train/run_layout.py"
SAE_FILES = "shared/saes/base.py"
OWNERS = {
    "config.json": LAYOUT, "sweep.json": LAYOUT, "checkpoints.json": LAYOUT, "metrics.jsonl": LAYOUT,
    "eval.json": LAYOUT, "final": LAYOUT, "train.lock": LAYOUT, "dashboard": LAYOUT,
    "trainer_state.json": LAYOUT, "trainer_state.safetensors": LAYOUT, "sparsity.safetensors": LAYOUT,
    "summary.csv": LAYOUT, "summary.json": LAYOUT, "plots.json": LAYOUT, "frontier_l0_ev.png": LAYOUT,
    "frontier_l0_ce.png": LAYOUT, "frontier_l0_kl.png": LAYOUT, "feature_density.png": LAYOUT,
    "frontier_l0_absorption.png": LAYOUT,
    "loss_curves.png": LAYOUT,
    "cfg.json": SAE_FILES, "sae_weights.safetensors": SAE_FILES,  # the SAE folder's own files
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are statements of their own: docstrings of modules,
    classes and functions, and the strings documenting an attribute below its assignment."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def string_uses(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string constant in `source` equal to one of `names`, docstrings left out."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in skip)


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_string_uses_sees_code_not_docstrings_or_comments():
    source = ('"""config.json: documented here."""\n'
              'X = 1  # config.json in a comment\n'
              'def f(run):\n'
              '    """Reads config.json."""\n'
              '    return run / "config.json", f"{run}/config.json", "final"\n')
    assert string_uses(source, {"config.json", "final"}) == [(5, "config.json"), (5, "final")]


def test_each_run_folder_name_is_written_only_by_its_owner():
    stray = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, name in string_uses(path.read_text(), set(OWNERS)):
            if OWNERS[name] != rel:
                stray.append(f"{rel}:{line}: {name!r} (ask {OWNERS[name]})")
    assert not stray, "run-folder names spelled outside their owner:\n" + "\n".join(stray)


@pytest.mark.parametrize("owner", sorted(set(OWNERS.values())))
def test_each_owner_defines_its_names(owner):
    """The list above stays true: every name is still spelled where it is said to be owned."""
    mine = {name for name, o in OWNERS.items() if o == owner}
    found = {name for _, name in string_uses((ROOT / owner).read_text(), mine)}
    assert found == mine


# ---- imports --------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it: `from pkg import name` counts as
    importing the module pkg.name when there is one, else pkg itself."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 more
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = _sources()
    known = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_train_has_no_import_cycle():
    graph = {m: {d for d in deps if d.split(".")[0] == "train"}
             for m, deps in import_graph().items() if m.split(".")[0] == "train"}
    assert "train.run_layout" in graph["train.run_folder"]  # the graph sees this import
    assert "train.sweep" not in graph["train.run_folder"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_layout_depends_on_no_other_train_module():
    """Everyone asks the layout; it asks no one in `train` (else a cycle is one import away)."""
    assert {m for m in import_graph()["train.run_layout"] if m.startswith("train")} == set()
