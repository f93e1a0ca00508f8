"""Write per-layer transcoders and cross-layer transcoders (CLTs) in circuit-tracer's on-disk form.

circuit-tracer (https://github.com/safety-research/circuit-tracer, PyPI `circuit-tracer`, checked
against 0.5.0) builds attribution graphs from a set of per-layer transcoders (PLTs; its
`TranscoderSet` of `SingleLayerTranscoder`s) or one `CrossLayerTranscoder`. Its README's
"Caching" section describes a local, circuit-tracer-compatible folder; this module writes exactly
that folder, which circuit-tracer's own loaders read with no conversion. Nothing here imports
circuit-tracer; `scripts/circuit_tracer_interop.sh` proves the folders load there.

The folder, as circuit-tracer 0.5 reads it
-----------------------------------------
`config.yaml` (written last: circuit-tracer takes its presence to mean the folder is complete)::

    model_kind: transcoder_set | cross_layer_transcoder     # which loader; required
    model_name: <HF / TransformerLens model name>          # the CLI's default --model
    feature_input_hook: <hook inside a block>              # required, e.g. hook_resid_mid
    feature_output_hook: <hook inside a block>             # required, e.g. hook_mlp_out
    scan: <folder name>                                    # a label for feature visualisation

The hooks are names *inside* a transformer block: the TransformerLens backend hooks
`blocks.{layer}.<name>` (resolving `<name>` attribute by attribute on each block), so give
`hook_resid_mid`, `ln2.hook_normalized`, `hook_mlp_in` or `mlp.hook_in` as the input and
`hook_mlp_out` or `mlp.hook_out` as the output, never `blocks.3.hook_mlp_out` (refused). The
nnsight backend accepts only the names in its per-architecture table (`utils/tl_nnsight_mapping.py`:
hook_resid_mid, ln2.hook_normalized, mlp.hook_in -> hook_mlp_out, mlp.hook_out).

Per-layer transcoders (`model_kind: transcoder_set`): one `layer_{l}.safetensors` per layer
l = 0..L-1 (every layer from 0 up, none missing), each holding, with d_model = d_in = d_out:

    W_enc                          [d_sae, d_model]   (ours transposed: circuit-tracer uses F.linear)
    b_enc                          [d_sae]
    W_dec                          [d_sae, d_model]
    b_dec                          [d_model]
    activation_function.threshold  [d_sae]            only for JumpReLU (its absence means ReLU)
    W_skip                         [d_model, d_model] only for skip transcoders (= ours, [d_out, d_in])

circuit-tracer computes f = act(x @ W_enc.T + b_enc), out = f @ W_dec + b_dec (+ x @ W_skip.T),
with JumpReLU(h) = h * (h > threshold): our formulas exactly (no b_dec subtraction from x).

Cross-layer transcoder (`model_kind: cross_layer_transcoder`): for each layer i = 0..L-1
`W_enc_{i}.safetensors` holding

    W_enc_{i}      [F, d_model]        (ours W_enc[i] transposed)
    b_enc_{i}      [F]
    b_dec_{i}      [d_model]
    threshold_{i}  [F]                 only for JumpReLU (read if threshold_0 exists)

and `W_dec_{i}.safetensors` holding `W_dec_{i}` [F, L-i, d_model] (ours W_dec_i unchanged: row j
decodes into layers i, i+1, ..., L-1). circuit-tracer counts L as the number of W_enc_*.safetensors
files, so nothing else in the folder may match that name.

Dtypes: any floating dtype on disk; circuit-tracer casts every tensor to the dtype it is asked to
load in (float32 by default via the cache loader, bfloat16 by default in `load_clt`). We keep each
tensor's own floating dtype and write it contiguous, on the CPU.

Loading a written folder in circuit-tracer (local paths; no Hugging Face access)::

    from circuit_tracer.utils.caching import load_transcoders_from_cache
    transcoders, config = load_transcoders_from_cache(folder.name, cache_dir=folder.parent)

    # or, for a whole replacement model / the CLI, with the folder's parent as the cache:
    #   CIRCUIT_TRACER_CACHE_DIR=<parent> ... ReplacementModel.from_pretrained(model_name, "<name>")
    #   CIRCUIT_TRACER_CACHE_DIR=<parent> circuit-tracer attribute --transcoder_set <name> ...
    # (don't name the folder "gemma" or "llama": circuit-tracer maps those names to its presets)

    # or the loaders directly:
    #   load_transcoder_set({l: f"{folder}/layer_{l}.safetensors" ...}, scan=..., feature_input_hook=..., feature_output_hook=...)
    #   load_clt(str(folder), feature_input_hook=..., feature_output_hook=..., dtype=torch.float32)

What circuit-tracer cannot express, refused here with a `UserError`:
  * TopK (or any activation but ReLU and JumpReLU): its loaders choose JumpReLU when a threshold
    is saved and ReLU otherwise, and nothing else.
  * d_in != d_out: a transcoder there has one width, d_model, for its input and its output.
  * a CLT with a skip connection: `load_clt` never reads W_skip from disk.
  * per-layer transcoders that differ in width, activation or skip-ness from layer to layer.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from shared.atomic import commit, save_tensors, temp_path
from shared.errors import UserError

CONFIG_NAME = "config.yaml"
TRANSCODER_SET = "transcoder_set"
CROSS_LAYER_TRANSCODER = "cross_layer_transcoder"
ACTIVATIONS = ("relu", "jumprelu")
_ACTIVATION_ALIASES = {"relu": "relu", "jumprelu": "jumprelu", "jump_relu": "jumprelu"}
_HOOK = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def plt_layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def clt_encoder_file(layer: int) -> str:
    return f"W_enc_{layer}.safetensors"


def clt_decoder_file(layer: int) -> str:
    return f"W_dec_{layer}.safetensors"


def write_transcoder_set(folder: str | Path, layers: Sequence[Mapping[str, torch.Tensor]], *, model_name: str,
                         input_hook: str, output_hook: str, activation: str) -> Path:
    """Write per-layer transcoders `layers[l]` (our tensors: W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae] for JumpReLU, optional W_skip
    [d_out, d_in]) as circuit-tracer's transcoder_set folder (see the module docstring).
    Replaces an earlier such folder whole; returns the folder."""
    activation = _activation(activation)
    _check_hooks(input_hook, output_hook)
    if len(layers) == 0:
        raise UserError("write_transcoder_set: give at least one layer's transcoder")
    files: dict[str, dict[str, torch.Tensor]] = {}
    first: tuple[int, int, bool] | None = None
    for layer, tensors in enumerate(layers):
        where = f"layer {layer}"
        _known(where, tensors, required=("W_enc", "b_enc", "W_dec", "b_dec"), optional=("threshold", "W_skip"))
        W_enc, b_enc, W_dec, b_dec = (_tensor(where, tensors, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
        _shape(where, "W_enc", W_enc, 2)
        d_in, d_sae = W_enc.shape
        _shape(where, "W_dec", W_dec, 2)
        d_out = W_dec.shape[1]
        if W_dec.shape[0] != d_sae:
            raise UserError(f"{where}: W_dec has {W_dec.shape[0]} rows but W_enc has {d_sae} features")
        _shape(where, "b_enc", b_enc, 1, (d_sae,))
        _shape(where, "b_dec", b_dec, 1, (d_out,))
        if d_in != d_out:
            raise UserError(f"{where}: circuit-tracer's transcoders read and write one width, d_model, "
                            f"but this one maps {d_in} to {d_out}")
        out = {"W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        threshold = _threshold(where, tensors, activation, (d_sae,))
        if threshold is not None:
            out["activation_function.threshold"] = threshold
        skip = tensors.get("W_skip")
        if skip is not None:
            skip = _tensor(where, tensors, "W_skip")
            _shape(where, "W_skip", skip, 2, (d_out, d_in))
            out["W_skip"] = skip
        this = (d_in, d_sae, skip is not None)
        if first is None:
            first = this
        elif this[:2] != first[:2]:
            raise UserError(f"{where}: circuit-tracer needs every layer's transcoder the same shape, but layer 0 "
                            f"is {first[0]}x{first[1]} and this one {this[0]}x{this[1]}")
        elif this[2] != first[2]:
            raise UserError(f"{where}: circuit-tracer needs W_skip in every layer or in none; layer 0 "
                            f"{'has' if first[2] else 'has none'}, this one {'has' if this[2] else 'has none'}")
        files[plt_layer_file(layer)] = out
    return _write_folder(Path(folder), files, _config(TRANSCODER_SET, Path(folder), model_name, input_hook, output_hook))


def write_clt(folder: str | Path, tensors: Mapping[str, Any], *, model_name: str, input_hook: str,
              output_hook: str, activation: str) -> Path:
    """Write a cross-layer transcoder (our tensors: W_enc [L, d_in, F], b_enc [L, F], W_dec_l
    [F, L-l, d_out] for l = 0..L-1 (keys "W_dec_0", ... or a list under "W_dec"), b_dec [L, d_out],
    threshold [L, F] for JumpReLU) as circuit-tracer's cross_layer_transcoder folder (see the module
    docstring). Replaces an earlier such folder whole; returns the folder."""
    activation = _activation(activation)
    _check_hooks(input_hook, output_hook)
    where = "CLT"
    if "W_skip" in tensors:
        raise UserError("CLT: circuit-tracer's load_clt never reads a skip connection from disk; "
                        "a CLT with W_skip cannot be written in its form")
    W_enc, b_enc, b_dec = (_tensor(where, tensors, n) for n in ("W_enc", "b_enc", "b_dec"))
    _shape(where, "W_enc", W_enc, 3)
    n_layers, d_in, n_features = W_enc.shape
    if n_layers == 0:
        raise UserError("CLT: W_enc covers no layers")
    decoders = _clt_decoders(tensors, n_layers)
    _known(where, tensors, required=("W_enc", "b_enc", "b_dec"),
           optional=("threshold", "W_dec", *(f"W_dec_{i}" for i in range(n_layers))))
    _shape(where, "b_enc", b_enc, 2, (n_layers, n_features))
    _shape(where, "b_dec", b_dec, 2)
    d_out = b_dec.shape[1]
    _shape(where, "b_dec", b_dec, 2, (n_layers, d_out))
    if d_in != d_out:
        raise UserError(f"CLT: circuit-tracer's CLTs read and write one width, d_model, but this one maps "
                        f"{d_in} to {d_out}")
    threshold = _threshold(where, tensors, activation, (n_layers, n_features))
    files: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(n_layers):
        W_dec_i = _as_tensor(where, f"W_dec_{i}", decoders[i])
        _shape(where, f"W_dec_{i}", W_dec_i, 3, (n_features, n_layers - i, d_out))
        enc = {f"W_enc_{i}": W_enc[i].T, f"b_enc_{i}": b_enc[i], f"b_dec_{i}": b_dec[i]}
        if threshold is not None:
            enc[f"threshold_{i}"] = threshold[i]
        files[clt_encoder_file(i)] = enc
        files[clt_decoder_file(i)] = {f"W_dec_{i}": W_dec_i}
    return _write_folder(Path(folder), files,
                         _config(CROSS_LAYER_TRANSCODER, Path(folder), model_name, input_hook, output_hook))


def _clt_decoders(tensors: Mapping[str, Any], n_layers: int) -> list[Any]:
    listed = tensors.get("W_dec")
    if listed is not None:
        if isinstance(listed, torch.Tensor) or not isinstance(listed, Sequence) or len(listed) != n_layers:
            raise UserError(f"CLT: W_dec must be a list of {n_layers} decoders, one per source layer "
                            "(W_dec_l [F, L-l, d_out])")
        if any(f"W_dec_{i}" in tensors for i in range(n_layers)):
            raise UserError("CLT: give the decoders either as the list W_dec or as W_dec_0, W_dec_1, ..., not both")
        return list(listed)
    missing = [f"W_dec_{i}" for i in range(n_layers) if f"W_dec_{i}" not in tensors]
    if missing:
        raise UserError(f"CLT: missing decoder {', '.join(missing)} (W_dec_l [F, L-l, d_out] for each layer l)")
    return [tensors[f"W_dec_{i}"] for i in range(n_layers)]


def _activation(activation: str) -> str:
    name = _ACTIVATION_ALIASES.get(str(activation).lower())
    if name is None:
        raise UserError(f"activation {activation!r}: circuit-tracer loads only relu and jumprelu transcoders "
                        "(it builds JumpReLU when a threshold is saved, ReLU otherwise)")
    return name


def _check_hooks(input_hook: str, output_hook: str) -> None:
    for what, hook in (("input_hook", input_hook), ("output_hook", output_hook)):
        m = re.fullmatch(r"blocks\.(\d+|\{layer\})\.(.+)", hook) if isinstance(hook, str) else None
        if m:
            raise UserError(f"{what} {hook!r}: circuit-tracer prefixes blocks.{{layer}}. itself; give {m.group(2)!r}")
        if not isinstance(hook, str) or not _HOOK.fullmatch(hook) or hook.startswith("blocks."):
            raise UserError(f"{what} {hook!r}: give a hook name inside a block, e.g. hook_resid_mid or hook_mlp_out")


def _config(kind: str, folder: Path, model_name: str, input_hook: str, output_hook: str) -> dict[str, str]:
    if not isinstance(model_name, str) or not model_name.strip():
        raise UserError("model_name: give the model's name, e.g. gpt2 or google/gemma-2-2b")
    return {"model_kind": kind, "model_name": model_name, "feature_input_hook": input_hook,
            "feature_output_hook": output_hook, "scan": folder.name}


def _known(where: str, tensors: Mapping[str, Any], *, required: Sequence[str], optional: Sequence[str]) -> None:
    missing = [n for n in required if n not in tensors]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    extra = sorted(set(tensors) - set(required) - set(optional))
    if extra:
        raise UserError(f"{where}: circuit-tracer has no place for {', '.join(extra)}")


def _tensor(where: str, tensors: Mapping[str, Any], name: str) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"{where}: missing {name}")
    return _as_tensor(where, name, tensors[name])


def _as_tensor(where: str, name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{where}: {name} is a {type(t).__name__}, not a tensor")
    if not t.is_floating_point():
        raise UserError(f"{where}: {name} is {t.dtype}, not a floating-point tensor")
    return t


def _shape(where: str, name: str, t: torch.Tensor, ndim: int, shape: tuple[int, ...] | None = None) -> None:
    if t.dim() != ndim or (shape is not None and tuple(t.shape) != shape):
        want = f"[{', '.join(map(str, shape))}]" if shape is not None else f"{ndim}-d"
        raise UserError(f"{where}: {name} has shape {list(t.shape)}, expected {want}")


def _threshold(where: str, tensors: Mapping[str, Any], activation: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    given = tensors.get("threshold")
    if activation == "relu":
        if given is not None:
            raise UserError(f"{where}: a threshold was given but activation is relu; say activation='jumprelu'")
        return None
    if given is None:
        raise UserError(f"{where}: activation is jumprelu but no threshold was given")
    threshold = _as_tensor(where, "threshold", given)
    _shape(where, "threshold", threshold, len(shape), shape)
    return threshold


def _write_folder(folder: Path, files: dict[str, dict[str, torch.Tensor]], config: dict[str, str]) -> Path:
    """Everything into a hidden sibling folder, config.yaml last, then renamed into place: a reader
    sees the old folder or the new one whole, never a mix (a stale layer file would change L)."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file())):
        raise UserError(f"{folder} exists and is not a circuit-tracer folder written here; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(folder)
    if tmp.exists():
        shutil.rmtree(tmp)  # a write interrupted earlier
    tmp.mkdir()
    try:
        for name, tensors in files.items():
            # cloned: safetensors refuses tensors that share memory, as views of one parameter can
            save_tensors({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, tmp / name)
        (tmp / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
        commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
