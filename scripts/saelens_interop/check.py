"""Check that SAE folders load unchanged in SAELens and compute what our code computed.

    python check.py [--rtol 1e-5] [--atol 1e-5] FOLDER [FOLDER ...]

Runs inside the sae-lens venv (scripts/saelens_interop.sh builds it); it must not import our
project. Each FOLDER holds cfg.json + sae_weights.safetensors (an SAE or a transcoder as our
`train` writes it) and interop_expected.safetensors with tensors x [n, d_in], feature_acts
[n, d_sae], sae_out [n, d_out] (our forward; d_out = d_in for an SAE) and optionally decoded
[n, d_out] (our decode(feature_acts); sae_out when absent) computed by our code. A skip
transcoder's forward adds x @ W_skip.T to the decoder's output, in SAELens as in ours, but
SAELens' `decode` leaves it out (it takes only the features), so decode is compared with
`decoded` and forward with `sae_out`. For each folder:

  * sae = sae_lens.SAE.load_from_disk(folder, device="cpu")
  * the loaded architecture must equal cfg.json's `architecture`, and sae.cfg.metadata.hook_name
    (and hook_name_out, a transcoder's output hook, which its cfg.json must name where d_out !=
    d_in) must equal cfg.json's metadata values when present; the loaded d_in, d_sae (and
    d_out, for a transcoder) must be x's, feature_acts' and sae_out's widths
  * sae.encode(x) ~ feature_acts, sae.decode(sae.encode(x)) ~ decoded, sae.decode(feature_acts)
    ~ decoded and sae(x) ~ sae_out (SAELens' transcoders return only sae_out from forward), each
    with torch.testing.assert_close(rtol, atol) (default 1e-5 relative and 1e-5 absolute)

Prints one line per folder, `ok   <arch> <Class> <d_in>-><d_sae>-><d_out> <folder> max|df|=...
max|dx|=... max|dy|=...` (features, decode, forward) or
`FAIL <folder>: <reason>`, and exits 1 if any folder failed (2 on bad usage).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

EXPECTED_FILE = "interop_expected.safetensors"


class CheckFailed(Exception):
    pass


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    if actual.is_sparse:
        actual = actual.to_dense()
    if tuple(actual.shape) != tuple(expected.shape):
        raise CheckFailed(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual = actual.detach().to(torch.float64)
    expected = expected.to(torch.float64)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise CheckFailed(f"{name}: {detail}") from None
    return (actual - expected).abs().max().item() if actual.numel() else 0.0


def check_folder(folder: Path, rtol: float, atol: float) -> str:
    from sae_lens import SAE

    cfg_path = folder / "cfg.json"
    expected_path = folder / EXPECTED_FILE
    for p in (cfg_path, folder / "sae_weights.safetensors", expected_path):
        if not p.is_file():
            raise CheckFailed(f"missing {p.name}")
    cfg = json.loads(cfg_path.read_text())
    expected = load_file(str(expected_path))
    missing = {"x", "feature_acts", "sae_out"} - set(expected)
    if missing:
        raise CheckFailed(f"{EXPECTED_FILE} lacks {sorted(missing)}")
    x, f_ours, out_ours = expected["x"], expected["feature_acts"], expected["sae_out"]
    decoded_ours = expected.get("decoded", out_ours)

    try:
        sae = SAE.load_from_disk(str(folder), device="cpu")
    except Exception as e:  # noqa: BLE001 - any load error is the finding
        raise CheckFailed(f"SAE.load_from_disk raised {type(e).__name__}: {e}") from None
    sae.eval()
    arch = sae.cfg.architecture()
    cls = type(sae).__name__

    if "architecture" in cfg and cfg["architecture"] != arch:
        raise CheckFailed(f"cfg.json architecture {cfg['architecture']!r} but SAELens loaded {arch!r} ({cls})")
    for key in ("hook_name", "hook_name_out"):  # the hook read, and a transcoder's hook written
        want_hook = (cfg.get("metadata") or {}).get(key)
        if want_hook is not None and sae.cfg.metadata[key] != want_hook:
            raise CheckFailed(f"metadata.{key} {sae.cfg.metadata[key]!r} != cfg.json's {want_hook!r}")
    if "d_out" in cfg and cfg["d_out"] != cfg.get("d_in") and not (cfg.get("metadata") or {}).get("hook_name_out"):
        raise CheckFailed("a transcoder's cfg.json names no metadata.hook_name_out (the hook it writes)")
    d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)  # only SAELens' transcoders have d_out
    for name, width, want in (("x", x.shape[-1], sae.cfg.d_in), ("feature_acts", f_ours.shape[-1], sae.cfg.d_sae),
                              ("sae_out", out_ours.shape[-1], d_out), ("decoded", decoded_ours.shape[-1], d_out)):
        if width != want:
            raise CheckFailed(f"{name} is {width} wide but the loaded {cls} has {want} there")

    x = x.to(sae.dtype)
    with torch.no_grad():
        f_lens = sae.encode(x)
        if f_lens.is_sparse:
            f_lens = f_lens.to_dense()
        df = _close("encode(x) vs feature_acts", f_lens, f_ours, rtol, atol)
        dx = _close("decode(encode(x)) vs decoded", sae.decode(f_lens), decoded_ours, rtol, atol)
        _close("decode(feature_acts) vs decoded", sae.decode(f_ours.to(sae.dtype)), decoded_ours, rtol, atol)
        out_lens = sae(x)
        if isinstance(out_lens, tuple):  # not in 6.54 (sae_out alone), but say so if a release changes it
            raise CheckFailed(f"{cls}.forward returned a {type(out_lens).__name__}, not a tensor")
        dy = _close("sae(x) vs sae_out", out_lens, out_ours, rtol, atol)
    shape = f"{sae.cfg.d_in}->{sae.cfg.d_sae}->{d_out}"
    return f"ok   {arch} {cls} {shape} {folder} max|df|={df:.2e} max|dx|={dx:.2e} max|dy|={dy:.2e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--traceback", action="store_true", help="print the traceback of unexpected errors")
    a = p.parse_args(argv)

    import sae_lens

    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}, rtol={a.rtol:g} atol={a.atol:g}")
    n_fail = 0
    for folder in a.folders:
        try:
            line = check_folder(folder, a.rtol, a.atol)
        except CheckFailed as e:
            line = f"FAIL {folder}: {e}"
        except Exception as e:  # noqa: BLE001
            if a.traceback:
                traceback.print_exc()
            line = f"FAIL {folder}: unexpected {type(e).__name__}: {e}"
        if line.startswith("FAIL"):
            n_fail += 1
            line = re.sub(r"\s*\n\s*", " ", line).strip()  # one line per folder, whatever the exception said
        print(line, flush=True)
    print(f"{len(a.folders) - n_fail} ok, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
