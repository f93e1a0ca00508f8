"""Hand-made SAE folders, one per SAELens inference architecture, to validate check.py.

    python make_fixtures.py OUT_DIR [--seed 0] [--n 64] [--d-in 16] [--d-sae 64] [--k 8]
                            [--extra-keys]

Writes OUT_DIR/{standard,topk,jumprelu,gated}/ each with cfg.json, sae_weights.safetensors
(SAELens' tensor names and layout) and interop_expected.safetensors (x, feature_acts, sae_out
computed here with the math below, in float32). Uses only torch, safetensors and json, so it
runs in either venv. With s = x - b_dec, h = s @ W_enc + b_enc, out = f @ W_dec + b_dec:

    standard  f = relu(h)
    topk      f = relu(top-k of h per row), other entries 0   (cfg: k, rescale_acts_by_decoder_norm=false)
    jumprelu  f = relu(h) * (h > threshold)                    (raw `threshold` tensor)
    gated     f = (s @ W_enc + b_gate > 0) * relu(s @ (W_enc * exp(r_mag)) + b_mag)   (no b_enc)

Rows of x whose result sits within a margin of a discontinuity (a top-k tie, h near a
JumpReLU threshold, a gate pre-activation near 0) are rejected, so float round-off between
two implementations cannot flip a feature. --extra-keys adds top-level keys SAELens does not
know (trained_architecture, input_scale_folded, l1_coefficient, ...), as our trainer writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
HOOK_NAME = "blocks.0.hook_mlp_out"
MARGIN = 1e-3


def _base_weights(g: torch.Generator, d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    # decoder rows deliberately NOT unit norm, b_dec non-zero: a loader that normalizes or
    # ignores b_dec (apply_b_dec_to_input) gives different numbers
    W_dec = torch.randn(d_sae, d_in, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g))
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    return {
        "W_enc": W_enc.contiguous(),
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": W_dec.contiguous(),
        "b_dec": 0.3 * torch.randn(d_in, generator=g),
    }


def make_weights(arch: str, g: torch.Generator, d_in: int, d_sae: int) -> dict[str, torch.Tensor]:
    w = _base_weights(g, d_in, d_sae)
    if arch in ("standard", "topk"):
        return w
    if arch == "jumprelu":
        # positive thresholds that cut off a good share of the ReLU-active units
        w["threshold"] = 1.5 * torch.rand(d_sae, generator=g) + 0.2
        return w
    if arch == "gated":
        del w["b_enc"]
        w["b_gate"] = 0.1 * torch.randn(d_sae, generator=g)
        w["r_mag"] = 0.3 * torch.randn(d_sae, generator=g)
        w["b_mag"] = 0.1 * torch.randn(d_sae, generator=g)
        return w
    raise ValueError(arch)


def reference(arch: str, w: dict[str, torch.Tensor], x: torch.Tensor, k: int):
    """Returns (feature_acts, sae_out, distance of each row to the nearest discontinuity)."""
    s = x - w["b_dec"]
    big = torch.full((x.shape[0],), float("inf"))
    if arch == "gated":
        gate_pre = s @ w["W_enc"] + w["b_gate"]
        mag_pre = s @ (w["W_enc"] * torch.exp(w["r_mag"])) + w["b_mag"]
        f = (gate_pre > 0).to(x.dtype) * torch.relu(mag_pre)
        margin = gate_pre.abs().amin(dim=-1)
    else:
        h = s @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            f = torch.relu(h)
            margin = big
        elif arch == "topk":
            vals, idx = torch.topk(h, k=k, dim=-1)
            f = torch.zeros_like(h).scatter_(-1, idx, torch.relu(vals))
            # gap between the k-th and (k+1)-th largest pre-activation
            top = torch.topk(h, k=k + 1, dim=-1).values
            margin = top[:, k - 1] - top[:, k]
        elif arch == "jumprelu":
            f = torch.relu(h) * (h > w["threshold"]).to(h.dtype)
            margin = (h - w["threshold"]).abs().amin(dim=-1)
        else:
            raise ValueError(arch)
    out = f @ w["W_dec"] + w["b_dec"]
    return f, out, margin


def make_cfg(arch: str, d_in: int, d_sae: int, k: int, extra_keys: bool) -> dict:
    cfg: dict = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "hook_name": HOOK_NAME,
            "model_name": "tiny",
        },
    }
    if arch == "topk":
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = False
    if extra_keys:
        cfg.update(
            {
                "trained_architecture": "batchtopk" if arch == "topk" else arch,
                "input_scale_folded": True,
                "l1_coefficient": 5.0,
                "lr": 3e-4,
                "some_nested_training_thing": {"a": 1, "b": [1, 2, 3]},
            }
        )
        cfg["metadata"]["dump_path"] = "/nonexistent/dump"
    return cfg


def write_fixture(
    folder: Path, arch: str, seed: int, n: int, d_in: int, d_sae: int, k: int, extra_keys: bool
) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + ARCHITECTURES.index(arch))
    w = make_weights(arch, g, d_in, d_sae)
    rows: list[torch.Tensor] = []
    for _ in range(100):
        cand = 2.0 * torch.randn(4 * n, d_in, generator=g)
        _, _, margin = reference(arch, w, cand, k)
        rows.extend(cand[margin > MARGIN])
        if len(rows) >= n:
            break
    if len(rows) < n:
        raise RuntimeError(f"{arch}: could not draw {n} rows clear of discontinuities")
    x = torch.stack(rows[:n]).contiguous()
    f, out, _ = reference(arch, w, x, k)

    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: t.float().contiguous() for name, t in w.items()}, str(folder / "sae_weights.safetensors"))
    save_file(
        {"x": x, "feature_acts": f.contiguous(), "sae_out": out.contiguous()},
        str(folder / "interop_expected.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps(make_cfg(arch, d_in, d_sae, k, extra_keys), indent=2) + "\n")
    nnz = (f != 0).float().sum(-1).mean().item()
    print(f"wrote {folder}  ({arch}, mean L0 {nnz:.1f} of {d_sae})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=64, help="rows of x")
    p.add_argument("--d-in", type=int, default=16)
    p.add_argument("--d-sae", type=int, default=64)
    p.add_argument("--k", type=int, default=8, help="topk's k")
    p.add_argument("--extra-keys", action="store_true", help="add top-level cfg keys SAELens does not know")
    p.add_argument("--arch", choices=ARCHITECTURES, action="append", help="only these (repeatable)")
    a = p.parse_args()
    for arch in a.arch or ARCHITECTURES:
        write_fixture(a.out_dir / arch, arch, a.seed, a.n, a.d_in, a.d_sae, a.k, a.extra_keys)


if __name__ == "__main__":
    main()
