"""Loading an SAE folder (`cfg.json` + `sae_weights.safetensors`), dispatching on its architecture."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.errors import UserError
from shared.saes.base import CFG_NAME, SAE, WEIGHTS_NAME, SAEConfig, read_cfg
from shared.saes.registry import architecture_class
from shared.saes.transcoder_names import SavedName, parse_saved_name


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE saved in `path`, as the class its cfg.json's `architecture` names (an SAE trained
    as BatchTopK or Matryoshka comes back as the JumpReLU SAE it was saved as)."""
    folder = Path(path)
    cfg = read_cfg(folder)
    name = parse_saved_name(str(cfg.get("architecture", "standard")))
    cls = architecture_class(name.architecture)
    tensors = _read_weights(folder / WEIGHTS_NAME, device)
    # Built on the meta device: no memory, and no draw from torch's RNG for an init that the
    # saved weights replace (loading must not change what a seeded run does next).
    name = name._replace(transcoder=name.transcoder or cls.transcoder_only)
    shape = SAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], d_out=cfg.get("d_out"),
                      apply_b_dec_to_input=not name.transcoder, n_hooks=cfg.get("n_hooks", 1))
    _check_transcoder_keys(folder, cfg, name)
    sae = cls(shape, cls.settings_from({**cfg, "skip_connection": name.skip}), device="meta")
    _check_architecture(folder, cfg, sae)
    _check_tensors(folder, tensors, sae)
    sae.load_inference_({name: t.to(torch.float32) for name, t in tensors.items()})
    sae.input_scale_folded = _folded_scale(folder, cfg, "input_scale_folded", 1.0)
    sae.target_scale_folded = _folded_scale(folder, cfg, "target_scale_folded", sae.input_scale_folded)
    return sae


def _check_transcoder_keys(folder: Path, cfg: dict, name: SavedName) -> None:
    """cfg.json's switches agree with its architecture's name: a transcoder does not subtract
    b_dec from its input, and names its skip path where it has one."""
    path = folder / CFG_NAME
    applied = cfg.get("apply_b_dec_to_input", not name.transcoder)
    if applied is name.transcoder or not isinstance(applied, bool):
        raise UserError(f"{path}: apply_b_dec_to_input is {applied!r}, but a '{cfg.get('architecture')}' "
                        f"{'transcoder' if name.transcoder else 'SAE'} has {not name.transcoder}: the file was "
                        "edited or damaged; restore it")
    skip = cfg.get("skip_connection", name.skip)
    if skip is not name.skip:
        raise UserError(f"{path}: skip_connection is {skip!r}, but architecture '{cfg.get('architecture')}' "
                        f"{'has' if name.skip else 'has no'} skip path: the file was edited or damaged; restore it")


def _folded_scale(folder: Path, cfg: dict, key: str, default: float) -> float:
    """A scale folded into the weights (`SAE.fold_scaling_`): a positive finite number."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UserError(f"{folder / CFG_NAME}: {key} is {value!r}, not a positive finite number: the file was "
                        "edited or damaged; restore it")
    return float(value)


def _read_weights(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing: the SAE folder holds no weights")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} could not be read as safetensors ({e})") from None


def _check_architecture(folder: Path, cfg: dict, sae: SAE) -> None:
    """cfg.json describes one SAE: the architecture it was trained as saves as the one it names,
    and the keys the architecture writes (activation_fn_str, k, ...) hold what it writes. Two
    architectures can have the same tensors (standard and topk): only these keys tell them apart."""
    path = folder / CFG_NAME
    trained = cfg.get("trained_architecture")
    if trained is not None:  # our folders record it; other SAELens folders need not
        trained_cls = architecture_class(str(trained))
        saved_as = trained_cls(sae.cfg, trained_cls.settings_from(cfg), device="meta").saved_form()[0]
        if saved_as != sae.saved_form()[0]:
            raise UserError(f"{path} names architecture '{sae.architecture}' but an SAE trained as '{trained}' "
                            f"is saved as '{saved_as}': the file was edited or damaged; restore it")
    _, _, extra = sae.inference_form()
    for key, value in extra.items():
        if key in cfg and cfg[key] != value:
            raise UserError(f"{path}: {key} is {cfg[key]!r}, but a {sae.architecture} SAE has {value!r}: the file "
                            "was edited or damaged; restore it")


def _check_tensors(folder: Path, tensors: dict[str, torch.Tensor], sae: SAE) -> None:
    """Exactly the tensors the architecture has, each of the shape cfg.json implies, floating
    point and finite (metrics of a NaN weight would be NaN, or silently wrong)."""
    _, expected, _ = sae.saved_form()
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UserError(f"{folder / WEIGHTS_NAME} lacks tensors {missing} (has {sorted(tensors)})")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise UserError(f"{folder / WEIGHTS_NAME} holds tensors {extra} that a {sae.architecture} SAE does not have")
    for name, want in expected.items():
        got = tuple(tensors[name].shape)
        if tuple(want.shape) != got:
            raise UserError(f"{folder / WEIGHTS_NAME}: {name} has shape {got}, but cfg.json "
                            f"(d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}, d_out={sae.cfg.d_out}) implies {tuple(want.shape)}")
    for name in expected:
        t = tensors[name]
        if not t.is_floating_point():
            raise UserError(f"{folder / WEIGHTS_NAME}: {name} is {t.dtype}, not floating point: the file is damaged")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{folder / WEIGHTS_NAME}: {name} holds NaN or infinite values: these weights give "
                            "no metrics; evaluate an earlier checkpoint of the run, or train it again")
