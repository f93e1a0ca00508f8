"""Write a few tiny transcoder folders in circuit-tracer's form, with what our formulas say they
compute beside each, for `check.py` to compare with circuit-tracer's loading of the same folder.

    python scripts/circuit_tracer_interop/make_tiny.py OUT_DIR     # prints the folders

Runs in this project's venv (never in the circuit-tracer one). Random tensors, written through
`shared.saes.circuit_tracer_form`; the expected tensors come from plain torch and the contract's
formulas (h = x @ W_enc + b_enc; f = relu(h) or h * (h > threshold); out = f @ W_dec + b_dec
(+ x @ W_skip.T); CLT out_m = sum over l <= m of f_l @ W_dec_l[:, m-l] + b_dec[m]).

Beside each folder's circuit-tracer files, `interop_expected.safetensors` holds, layers first as
circuit-tracer takes them: x [L, n, d], feature_acts [L, n, F] and out [L, n, d].
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.saes.circuit_tracer_form import write_clt, write_transcoder_set

EXPECTED_FILE = "interop_expected.safetensors"
MODEL = "gpt2"
D, F, N = 16, 24, 12   # d_model, features per layer, positions


def _inputs(n_layers: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n_layers, N, D, generator=g)


def _act(h: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    return torch.relu(h) if threshold is None else h * (h > threshold)


def _plt_layer(g: torch.Generator, jumprelu: bool, skip: bool) -> dict[str, torch.Tensor]:
    t = {"W_enc": torch.randn(D, F, generator=g) / D ** 0.5, "b_enc": 0.1 * torch.randn(F, generator=g),
         "W_dec": torch.randn(F, D, generator=g) / F ** 0.5, "b_dec": 0.1 * torch.randn(D, generator=g)}
    if jumprelu:
        t["threshold"] = 0.3 * torch.rand(F, generator=g)
    if skip:
        t["W_skip"] = 0.1 * torch.randn(D, D, generator=g)
    return t


def plt_expected(layers: list[dict[str, torch.Tensor]], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats, outs = [], []
    for layer, t in enumerate(layers):
        f = _act(x[layer] @ t["W_enc"] + t["b_enc"], t.get("threshold"))
        out = f @ t["W_dec"] + t["b_dec"]
        if "W_skip" in t:
            out = out + x[layer] @ t["W_skip"].T
        feats.append(f)
        outs.append(out)
    return torch.stack(feats), torch.stack(outs)


def make_plt(out: Path, name: str, n_layers: int, jumprelu: bool, skip: bool, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    layers = [_plt_layer(g, jumprelu, skip) for _ in range(n_layers)]
    folder = write_transcoder_set(out / name, layers, model_name=MODEL, input_hook="ln2.hook_normalized",
                                  output_hook="hook_mlp_out", activation="jumprelu" if jumprelu else "relu")
    x = _inputs(n_layers, g)
    f, y = plt_expected(layers, x)
    _save_expected(folder, x, f, y)
    return folder


def clt_expected(t: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_layers = t["W_enc"].shape[0]
    h = torch.einsum("lnd,ldf->lnf", x, t["W_enc"]) + t["b_enc"][:, None]
    f = _act(h, None if "threshold" not in t else t["threshold"][:, None])
    out = t["b_dec"][:, None].repeat(1, x.shape[1], 1)
    for m in range(n_layers):
        for source in range(m + 1):
            out[m] += f[source] @ t[f"W_dec_{source}"][:, m - source, :]
    return f, out


def make_clt(out: Path, name: str, n_layers: int, jumprelu: bool, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "W_enc": torch.randn(n_layers, D, F, generator=g) / D ** 0.5,
        "b_enc": 0.1 * torch.randn(n_layers, F, generator=g),
        "b_dec": 0.1 * torch.randn(n_layers, D, generator=g)}
    for source in range(n_layers):
        t[f"W_dec_{source}"] = torch.randn(F, n_layers - source, D, generator=g) / F ** 0.5
    if jumprelu:
        t["threshold"] = 0.3 * torch.rand(n_layers, F, generator=g)
    folder = write_clt(out / name, t, model_name=MODEL, input_hook="hook_resid_mid", output_hook="hook_mlp_out",
                       activation="jumprelu" if jumprelu else "relu")
    x = _inputs(n_layers, g)
    f, y = clt_expected(t, x)
    _save_expected(folder, x, f, y)
    return folder


def _save_expected(folder: Path, x: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    # circuit-tracer's sparse decode sizes its output by the last position with an active
    # feature: a tiny case must have one at every position for the shapes to agree.
    assert bool((f != 0).any(dim=-1).all()), f"{folder}: a position with no active feature"
    assert bool((f == 0).any()), f"{folder}: no inactive feature: the activation is not exercised"
    save_file({"x": x.contiguous(), "feature_acts": f.contiguous(), "out": out.contiguous()},
              str(folder / EXPECTED_FILE))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    folders = [
        make_plt(out, "plt_relu", 3, jumprelu=False, skip=False, seed=0),
        make_plt(out, "plt_jumprelu", 3, jumprelu=True, skip=False, seed=1),
        make_plt(out, "plt_jumprelu_skip", 2, jumprelu=True, skip=True, seed=2),
        make_clt(out, "clt_jumprelu", 3, jumprelu=True, seed=3),
        make_clt(out, "clt_relu", 2, jumprelu=False, seed=4),
    ]
    for folder in folders:
        print(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/circuit_tracer_interop/make_tiny.py OUT_DIR")
    main(Path(sys.argv[1]))
