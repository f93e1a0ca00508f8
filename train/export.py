"""`export-to`: write trained dictionaries in the forms other tools load.

    export-to circuit-tracer RUN/final --out FOLDER                # a cross-layer transcoder
    export-to circuit-tracer L0/final L1/final ... --out FOLDER    # per-layer transcoders, layer 0 first

The folder is circuit-tracer's (see `shared.saes.circuit_tracer_form`): load it with
`circuit_tracer.utils.caching.load_transcoders_from_cache(FOLDER.name, cache_dir=FOLDER.parent)`.
Transcoders and SAEs are already in SAELens' form as `train` saves them (`SAE.load_from_disk`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from shared.cli_errors import one_line_errors
from shared.errors import UserError

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def block_hook(hook: Any, where: str) -> tuple[int, str]:
    """'blocks.3.mlp.hook_in' -> (3, 'mlp.hook_in'): circuit-tracer names hooks inside a block."""
    match = _BLOCK.match(str(hook))
    if not match:
        raise UserError(f"{where}: hook {hook!r} is not inside a transformer block (blocks.N.<name>); "
                        "circuit-tracer hooks a name inside every block")
    return int(match.group(1)), match.group(2)


def _hooks(cfg: dict[str, Any], folder: Path) -> tuple[list[str], list[str]]:
    """The input and target hooks a saved dictionary was trained on, in order."""
    meta = cfg.get("metadata") or {}
    target = cfg.get("target")
    if not isinstance(target, dict):
        raise UserError(f"{folder}: not a transcoder (it reconstructs its own input); circuit-tracer loads "
                        "transcoders and cross-layer transcoders")
    inputs = [meta.get("hook_name") or cfg.get("hook_point")]
    inputs += [e.get("hook_point") for e in cfg.get("more_inputs") or []]
    targets = [target.get("hook_point")] + [e.get("hook_point") for e in cfg.get("more_targets") or []]
    return inputs, targets


def _layers(hooks: list[str], folder: Path, what: str) -> str:
    """The one in-block name of hooks at layers 0, 1, ..., in order; else a one-line error."""
    names = set()
    for i, hook in enumerate(hooks):
        layer, name = block_hook(hook, str(folder))
        if layer != i:
            raise UserError(f"{folder}: its {what} hooks are {hooks}; circuit-tracer needs layers 0, 1, 2, ... in "
                            "order, one hook name at each")
        names.add(name)
    if len(names) != 1:
        raise UserError(f"{folder}: its {what} hooks {hooks} are not one hook name at every layer")
    return names.pop()


def export_circuit_tracer(folders: list[Path], out: Path, model_name: str | None = None) -> Path:
    """Write the CLT in `folders[0]`, or the per-layer transcoders `folders` (layer 0 first);
    `model_name` (what circuit-tracer loads the model by) defaults to the dump's model."""
    from shared.saes import load_sae
    from shared.saes.base import read_cfg
    from shared.saes.circuit_tracer_form import write_clt, write_transcoder_set
    from shared.saes.clt import CrossLayerTranscoder

    saes = [load_sae(f) for f in folders]
    cfgs = [read_cfg(f) for f in folders]
    model = model_name or str(cfgs[0].get("model_name") or (cfgs[0].get("metadata") or {}).get("model_name") or "")
    if isinstance(saes[0], CrossLayerTranscoder):
        if len(saes) > 1:
            raise UserError("give one cross-layer transcoder folder (it covers every layer), not several")
        sae, folder = saes[0], folders[0]
        if sae.architecture != "jumprelu_clt":
            raise UserError(f"{folder}: circuit-tracer's CLTs are JumpReLU or ReLU; a {sae.architecture} cannot "
                            "be written in its form (train --architecture jumprelu_clt)")
        inputs, targets = _hooks(cfgs[0], folder)
        L = sae.n_layers
        tensors = {"W_enc": sae.W_enc.detach(), "b_enc": sae.b_enc.detach(),
                   "b_dec": sae.b_dec.detach().reshape(L, -1), "threshold": sae.threshold.detach().reshape(L, -1)}
        tensors |= {f"W_dec_{i}": w.detach() for i, w in enumerate(sae.decoders())}
        return write_clt(out, tensors, model_name=model, input_hook=_layers(inputs, folder, "input"),
                         output_hook=_layers(targets, folder, "target"), activation="jumprelu")
    inputs, targets, layers, activations = [], [], [], set()
    for sae, cfg, folder in zip(saes, cfgs, folders):
        if not sae.cfg.transcoder or sae.cfg.n_hooks != 1:
            raise UserError(f"{folder}: not a one-layer transcoder; give one transcoder folder per layer, or one "
                            "cross-layer transcoder")
        name, tensors, _ = sae.saved_form()
        if name not in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
            raise UserError(f"{folder}: a {name} has no form in circuit-tracer (ReLU and JumpReLU transcoders "
                            "only; BatchTopK and Matryoshka save as JumpReLU)")
        activations.add("jumprelu" if "jumprelu" in name else "relu")
        hooks_in, hooks_out = _hooks(cfg, folder)
        inputs += hooks_in
        targets += hooks_out
        layers.append({k: v.detach() for k, v in tensors.items()})
    if len(activations) > 1:
        raise UserError("circuit-tracer needs one activation function at every layer; these transcoders mix "
                        "ReLU and JumpReLU")
    first = Path(folders[0])
    return write_transcoder_set(out, layers, model_name=model, input_hook=_layers(inputs, first, "input"),
                                output_hook=_layers(targets, first, "target"), activation=activations.pop())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Write trained dictionaries in the forms other tools load (SAELens reads `train`'s own folders)."""


@main.command("circuit-tracer")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write (replaced whole if an earlier export wrote it).")
@click.option("--model-name", default=None,
              help="The model's name as circuit-tracer loads it (a Hugging Face name) [the dump's model; a "
                   "packaged alias such as smollm2-135m means nothing to circuit-tracer: give the hub name]")
def circuit_tracer(folders: tuple[Path, ...], out: Path, model_name: str | None) -> None:
    """A cross-layer transcoder (one final folder) or per-layer transcoders (one final folder per
    layer, layer 0 first) as the folder circuit-tracer loads.

    Example: export-to circuit-tracer data/runs/clt/final --out data/ct/my_clt
    """
    with one_line_errors("export-to"):
        written = export_circuit_tracer(list(folders), out, model_name)
    click.echo(str(written))
