"""Load a TransformerLens 4.x `TransformerBridge` by name, and resolve hook points on it.

Used by `harvest` (to produce activations) and by `train` (to evaluate with the SAE spliced in).
"""
from __future__ import annotations

import difflib
import json
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from shared.errors import UserError
from shared.hub import hub_offline, hub_reachable, unreachable
from shared.manifest import fingerprint


CACHE_ENV = "MATS_SAE_CACHE"
APP_NAME = "mats-sae-training"


def cache_root() -> Path:
    """Where packaged models and corpora are unpacked, once per user: $MATS_SAE_CACHE, else the
    platform's per-user cache folder (so a script run from any working directory finds them):
    $XDG_CACHE_HOME or ~/.cache on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows,
    each with a `mats-sae-training` folder (the XDG Base Directory specification and the
    platforms' own conventions)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    return platform_cache_dir() / APP_NAME


def platform_cache_dir() -> Path:
    import sys

    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"

# Repos holding TransformerLens-format weights (not Hugging Face models): booted via boot_tl_legacy.
_LEGACY_PREFIXES = ("NeelNanda/", "ArthurConmy/", "Baidicoot/")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_name(name: str) -> tuple[str, str]:
    """Return (how to boot, what to boot): ("transformers", dir or repo) or ("legacy", repo)."""
    from shared.packaged import resolve_model_alias

    local = resolve_model_alias(name, cache_root() / "models")
    if local is not None:
        return "transformers", local
    if Path(name).is_dir():
        return "transformers", name
    from transformer_lens.supported_models import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        return "transformers", name
    if official.startswith(_LEGACY_PREFIXES):
        return "legacy", official
    return "transformers", official


def load_model(name: str, device: str, dtype: str = "float32", progress: bool = False) -> Any:
    """Boot a TransformerBridge in eval mode; a one-line UserError if it cannot be loaded.
    `progress`: say every few seconds that it is still loading (a large model takes a while)."""
    from transformer_lens.model_bridge import TransformerBridge

    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model folder {name} not found: give a Hugging Face model folder, a hub name, "
                        "or the packaged smollm2-135m")
    kind, target = resolve_model_name(name)
    _quiet_transformers()
    torch_dtype = TORCH_DTYPES[dtype]
    # A name on the hub with no hub to reach: only the local hub cache, without the retries.
    offline = not Path(target).is_dir() and not hub_reachable()
    from shared.progress import still

    try:
        with hub_offline() if offline else nullcontext(), still(f"loading {name}", progress):
            if kind == "legacy":
                model = TransformerBridge.boot_tl_legacy(target, device=device, dtype=torch_dtype)
            else:
                model = TransformerBridge.boot_transformers(target, device=device, dtype=torch_dtype)
    except Exception as e:  # hub, network and format errors come in many types
        if offline:
            raise UserError(unreachable(f"model '{name}'", "smollm2-135m")) from None
        offline = " (no network here? pass a local Hugging Face folder)" if not Path(name).is_dir() else ""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{name}'{offline}: {msg}") from None
    model.eval()
    return model


def _quiet_transformers() -> None:
    """Our own progress bar and messages say what is happening; hide the per-file bars."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_fingerprint(model: Any) -> str:
    """Hash of the model's architecture config, to tell dumps of different models apart."""
    hf = getattr(model, "original_model", None)
    cfg = hf.config.to_dict() if hf is not None and hasattr(hf, "config") else vars(model.cfg)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version",)}
    return fingerprint(json.loads(json.dumps(cfg, default=str)))


def hook_names(model: Any) -> list[str]:
    return sorted(model.hook_dict.keys())


def check_hook(model: Any, hook: str) -> None:
    """UserError naming the nearest valid hook points when `hook` does not exist, or saying how
    to get the activations when it exists but is gated off on the bridge (it would never fire)."""
    names = hook_names(model)
    if hook in names:
        gated = getattr(model, "_gated_hook_reason", None)  # TransformerBridge's own check
        reason = gated(model.hook_dict[hook].name or hook) if callable(gated) else None
        if reason is None:
            return
        m = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_in", hook)
        if m:
            raise UserError(f"hook '{hook}' never fires on this model unless enabled, and then holds the "
                            f"residual before ln2: record blocks.{m.group(1)}.mlp.hook_in for the MLP's "
                            f"input (or blocks.{m.group(1)}.hook_resid_mid for the residual before ln2)")
        raise UserError(f"hook '{hook}' never fires on this model (TransformerLens' {reason} is off); "
                        "record another hook point")
    near = difflib.get_close_matches(hook, names, n=5, cutoff=0.5)
    hint = f"nearest: {', '.join(near)}" if near else f"e.g. {', '.join(names[:5])}"
    raise UserError(f"unknown hook '{hook}' for this model; {hint}")


def hook_layer(hook: str) -> int | None:
    """Block index of a hook (blocks.3.* -> 3); -1 for embedding hooks; None if after all blocks."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m:
        return int(m.group(1))
    if hook.startswith(("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")):
        return -1
    return None


def stop_at_layer(hooks: list[str]) -> int | None:
    """Run blocks only up to the deepest requested hook; None means the whole model is needed."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    # stop_at_layer=k runs blocks 0..k-1; at least one block keeps the bridge's code path simple.
    return max(1, max(layers) + 1)  # type: ignore[type-var]


def model_n_layers(model: Any) -> int:
    """Transformer blocks in the model."""
    return int(getattr(model.cfg, "n_layers", None) or len(model.blocks))


def model_n_ctx(model: Any) -> int | None:
    return getattr(model.cfg, "n_ctx", None)


def bos_token_id(model: Any) -> int | None:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return None
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def short_model_name(name: str) -> str:
    """Folder-friendly model name: 'gelu-2l' -> 'gelu2l', '/x/SmolLM2-135M' -> 'smollm2135m'."""
    base = os.path.basename(name.rstrip("/")) or name
    return re.sub(r"[^a-z0-9]", "", base.lower()) or "model"


def default_dump_folder(model: str, hook: str) -> Path:
    """Where `harvest` puts a single-hook dump by default: data/{model}_l{layer}."""
    layer = hook_layer(hook)
    suffix = f"l{layer}" if layer is not None and layer >= 0 else hook.replace(".", "_")
    return Path("data") / f"{short_model_name(model)}_{suffix}"
