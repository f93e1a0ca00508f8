"""`--mlp-pairs`: the hook pairs a transcoder trains on (the MLP's input and its output at a layer),
for one layer, a range of layers or all of them (a cross-layer transcoder), from one model pass.

On a TransformerLens 4.x `TransformerBridge` (checked on GPT-2 / gelu-2l-like and Llama /
SmolLM2-like models, tests/test_mlp_pairs.py):

- `blocks.{l}.mlp.hook_in` is what the MLP reads: the output of the second norm (ln2), its weight
  and bias applied. `blocks.{l}.ln2.hook_out` holds the same tensor. (`blocks.{l}.ln2.hook_normalized`
  is before the norm's weight and bias, so it is not the MLP's input unless those are folded away;
  `blocks.{l}.hook_mlp_in` is off unless enabled on the bridge, and then holds the residual before
  ln2, not the normalised input.)
- `blocks.{l}.hook_resid_mid` is the residual stream after attention, before ln2: mlp.hook_in is
  ln2(hook_resid_mid).
- `blocks.{l}.hook_mlp_out` is the MLP's output (the bridge's alias of `blocks.{l}.mlp.hook_out`).
"""
from __future__ import annotations

import re

from shared.errors import UserError

MLP_OUTPUT = "blocks.{layer}.hook_mlp_out"
MLP_INPUTS = {
    "mlp-in": "blocks.{layer}.mlp.hook_in",  # what the MLP reads: ln2's output (default)
    "resid-mid": "blocks.{layer}.hook_resid_mid",  # the residual stream before ln2 (a CLT's input)
}
DEFAULT_INPUT = "mlp-in"
ALL = "all"

_SPEC_HELP = "give a layer (3), a range with both ends included (0..5), a list (0,2,4) or all"
_ITEM = re.compile(r"(\d+)(?:\s*(?:\.\.|-)\s*(\d+))?")


def parse_layers(spec: str) -> tuple[int, ...] | str:
    """'3' -> (3,); '0..2' (or '0-2') -> (0, 1, 2); '0,2..3' -> (0, 2, 3); 'all' -> 'all'.
    Sorted, repeats dropped; a one-line UserError for anything else."""
    text = spec.strip().lower()
    if text == ALL:
        return ALL
    layers: set[int] = set()
    for item in text.split(","):
        m = _ITEM.fullmatch(item.strip())
        if not m:
            raise UserError(f"--mlp-pairs '{spec}' is not a layer spec: {_SPEC_HELP}")
        first, last = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if last < first:
            raise UserError(f"--mlp-pairs '{spec}': the range {first}..{last} runs backwards; "
                            f"write {last}..{first}")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))


def layers_for(spec: str, n_layers: int) -> list[int]:
    """The layers `spec` names on a model of `n_layers` blocks; a one-line UserError past its end."""
    parsed = parse_layers(spec)
    if parsed == ALL:
        return list(range(n_layers))
    assert isinstance(parsed, tuple)
    if parsed[-1] >= n_layers:
        raise UserError(f"--mlp-pairs {spec}: the model has {n_layers} layer{'s' * (n_layers != 1)} "
                        f"(0..{n_layers - 1}); pick layers in 0..{n_layers - 1}, or all")
    return list(parsed)


def pair_hooks(layers: list[int], source: str = DEFAULT_INPUT) -> list[str]:
    """The input and output hook of each layer, in layer order: [in 0, out 0, in 1, out 1, ...]."""
    if source not in MLP_INPUTS:
        raise UserError(f"--mlp-pairs-input must be one of {', '.join(MLP_INPUTS)}, got '{source}'")
    return [h.format(layer=layer) for layer in layers for h in (MLP_INPUTS[source], MLP_OUTPUT)]


_ROLES = (
    (re.compile(r"blocks\.(\d+)\.mlp\.hook_in"), "layer {} MLP input (after ln2)"),
    (re.compile(r"blocks\.(\d+)\.hook_resid_mid"), "layer {} residual stream before the MLP (before ln2)"),
    (re.compile(r"blocks\.(\d+)\.hook_mlp_out"), "layer {} MLP output"),
)


def hook_role(hook: str) -> str | None:
    """What a pair hook holds, in words (None for other hooks): for the list of dumps harvest prints."""
    for pattern, words in _ROLES:
        m = pattern.fullmatch(hook)
        if m:
            return words.format(m.group(1))
    return None
