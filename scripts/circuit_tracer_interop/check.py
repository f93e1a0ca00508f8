"""Check that transcoder folders load unchanged in circuit-tracer and compute what our formulas say.

    python check.py [--rtol 1e-5] [--atol 1e-5] [--no-graph] FOLDER [FOLDER ...]

Runs inside the circuit-tracer venv (scripts/circuit_tracer_interop.sh builds it); it must not
import our project. Each FOLDER holds circuit-tracer's form (config.yaml with model_kind
transcoder_set + layer_{l}.safetensors, or cross_layer_transcoder + W_enc_{i}/W_dec_{i}
.safetensors), as `shared.saes.circuit_tracer_form` writes it, and interop_expected.safetensors
with x [L, n, d], feature_acts [L, n, F] and out [L, n, d] computed by our side. For each folder:

  * loaded with circuit-tracer's own local-folder loader,
    `circuit_tracer.utils.caching.load_transcoders_from_cache(folder.name, cache_dir=folder.parent)`,
    once eager (lazy_encoder=lazy_decoder=False) and once lazy (both True: weights read from the
    files by tensor name when used), and once with the direct loader (`load_transcoder_set` over
    the layer files, or `load_clt` on the folder), all float32 on the CPU;
  * the loaded kind, layer count, width and hooks must be config.yaml's;
  * encode(x) ~ feature_acts; decode(feature_acts) ~ out; forward(x) ~ out (each layer's
    transcoder for a set); encode_layer(x[l], l) ~ feature_acts[l]; and the sparse path that
    attribution itself uses, compute_attribution_components(x, zero_positions=slice(0, 0)):
    its activation matrix ~ feature_acts and its reconstruction ~ out; each with
    torch.testing.assert_close(rtol, atol) (default 1e-5 and 1e-5);
  * unless --no-graph: a random-weight TransformerLens model of the same shape
    (`ReplacementModel.from_config`, nothing downloaded) takes the transcoders, which resolves the
    config's hooks in each block, and `attribute` builds a graph over a short prompt.

Prints one line per folder, `ok   <kind> <Class> <folder> ...` or `FAIL <folder>: <reason>`, and
exits 1 if any folder failed (2 on bad usage).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: nothing is downloaded

import torch
import yaml
from safetensors.torch import load_file

EXPECTED_FILE = "interop_expected.safetensors"
CPU = torch.device("cpu")
_TOKENIZER_DIR = None


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


def _load_all(folder: Path, cfg: dict) -> dict[str, object]:
    """The folder as circuit-tracer's loaders give it: {how: transcoders}."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    loaded = {}
    for lazy in (False, True):
        how = "cache-lazy" if lazy else "cache-eager"
        try:
            loaded[how], _ = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=CPU,
                                                         dtype=torch.float32, lazy_encoder=lazy, lazy_decoder=lazy)
        except Exception as e:  # noqa: BLE001 - any load error is the finding
            raise CheckFailed(f"load_transcoders_from_cache ({how}) raised {type(e).__name__}: {e}") from None
    try:
        if cfg["model_kind"] == "transcoder_set":
            paths = {int(p.stem.split("_")[1]): str(p) for p in folder.glob("layer_*.safetensors")}
            loaded["direct"] = load_transcoder_set(paths, scan=cfg.get("scan"), device=CPU, dtype=torch.float32,
                                                   feature_input_hook=cfg["feature_input_hook"],
                                                   feature_output_hook=cfg["feature_output_hook"],
                                                   lazy_encoder=False, lazy_decoder=False)
        else:
            loaded["direct"] = load_clt(str(folder), feature_input_hook=cfg["feature_input_hook"],
                                        feature_output_hook=cfg["feature_output_hook"], scan=cfg.get("scan"),
                                        device=CPU, dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"the direct loader raised {type(e).__name__}: {e}") from None
    return loaded


def _compare(how: str, tc, cfg: dict, x, f_ours, out_ours, rtol: float, atol: float) -> tuple[float, float]:
    from circuit_tracer.transcoder import TranscoderSet
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    want = TranscoderSet if cfg["model_kind"] == "transcoder_set" else CrossLayerTranscoder
    if not isinstance(tc, want):
        raise CheckFailed(f"{how}: loaded a {type(tc).__name__}, not a {want.__name__}")
    n_layers = x.shape[0]
    if tc.n_layers != n_layers or tc.d_transcoder != f_ours.shape[-1]:
        raise CheckFailed(f"{how}: loaded {tc.n_layers} layers x {tc.d_transcoder} features, expected "
                          f"{n_layers} x {f_ours.shape[-1]}")
    for key in ("feature_input_hook", "feature_output_hook"):
        if getattr(tc, key) != cfg[key]:
            raise CheckFailed(f"{how}: {key} {getattr(tc, key)!r} != config.yaml's {cfg[key]!r}")

    p = f"{how}: "
    with torch.no_grad():
        f_ct = tc.encode(x)
        df = _close(p + "encode(x) vs feature_acts", f_ct, f_ours, rtol, atol)
        for layer in range(n_layers):
            _close(p + f"encode_layer(x[{layer}], {layer}) vs feature_acts[{layer}]",
                   tc.encode_layer(x[layer], layer), f_ours[layer], rtol, atol)
        if isinstance(tc, TranscoderSet):
            dx = _close(p + "decode(feature_acts, x) vs out", tc.decode(f_ours, x), out_ours, rtol, atol)
            _close(p + "decode(encode(x), x) vs out", tc.decode(f_ct, x), out_ours, rtol, atol)
            for layer in range(n_layers):
                _close(p + f"transcoders[{layer}](x[{layer}]) vs out[{layer}]", tc[layer](x[layer]),
                       out_ours[layer], rtol, atol)
        else:
            dx = _close(p + "decode(feature_acts) vs out", tc.decode(f_ours.to_sparse(), x), out_ours, rtol, atol)
            _close(p + "forward(x) vs out", tc(x), out_ours, rtol, atol)
        parts = tc.compute_attribution_components(x, zero_positions=slice(0, 0))
        _close(p + "compute_attribution_components: activation_matrix vs feature_acts",
               parts["activation_matrix"], f_ours, rtol, atol)
        _close(p + "compute_attribution_components: reconstruction vs out", parts["reconstruction"],
               out_ours, rtol, atol)
    return df, dx


def _tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer built in memory (attribute decodes the prompt and its logit targets)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", unk_token="<unk>")
    # Through a folder: TransformerLens reloads a tokenizer by its name_or_path to add the BOS.
    import tempfile
    from transformers import AutoTokenizer

    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.TemporaryDirectory(prefix="ct-tokenizer-")  # removed at exit
    fast.save_pretrained(_TOKENIZER_DIR.name)
    return AutoTokenizer.from_pretrained(_TOKENIZER_DIR.name)


def _graph(tc, d_model: int) -> str:
    """A random-weight TransformerLens model takes the transcoders (its blocks must have the
    config's hooks) and `attribute` builds a graph: the path a researcher's run takes."""
    from circuit_tracer import ReplacementModel, attribute
    from transformer_lens import HookedTransformerConfig

    torch.manual_seed(0)
    config = HookedTransformerConfig(n_layers=tc.n_layers, d_model=d_model, n_ctx=16, d_head=4,
                                     n_heads=d_model // 4, d_mlp=4 * d_model, d_vocab=32, act_fn="gelu",
                                     normalization_type="LN", device="cpu", seed=0)
    try:
        model = ReplacementModel.from_config(config, tc, tokenizer=_tiny_tokenizer(config.d_vocab))
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"ReplacementModel.from_config raised {type(e).__name__}: {e}") from None
    prompt = torch.tensor([0, 5, 9, 3, 7, 2, 11])
    try:
        graph = attribute(prompt, model, max_n_logits=3, batch_size=64, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"attribute raised {type(e).__name__}: {e}") from None
    n_feat = len(graph.active_features)
    if n_feat == 0:
        raise CheckFailed("attribute built a graph with no active features")
    return f"graph: {n_feat} features, adjacency {tuple(graph.adjacency_matrix.shape)}"


def check_folder(folder: Path, rtol: float, atol: float, graph: bool) -> str:
    cfg_path = folder / "config.yaml"
    expected_path = folder / EXPECTED_FILE
    for p in (cfg_path, expected_path):
        if not p.is_file():
            raise CheckFailed(f"missing {p.name}")
    cfg = yaml.safe_load(cfg_path.read_text())
    if cfg.get("model_kind") not in ("transcoder_set", "cross_layer_transcoder"):
        raise CheckFailed(f"config.yaml model_kind {cfg.get('model_kind')!r}")
    expected = load_file(str(expected_path))
    missing = {"x", "feature_acts", "out"} - set(expected)
    if missing:
        raise CheckFailed(f"{EXPECTED_FILE} lacks {sorted(missing)}")
    x, f_ours, out_ours = expected["x"], expected["feature_acts"], expected["out"]

    loaded = _load_all(folder, cfg)
    worst_df = worst_dx = 0.0
    for how, tc in loaded.items():
        df, dx = _compare(how, tc, cfg, x, f_ours, out_ours, rtol, atol)
        worst_df, worst_dx = max(worst_df, df), max(worst_dx, dx)
    tc = loaded["cache-lazy"]
    act = tc.activation_function if hasattr(tc, "activation_function") else tc[0].activation_function
    act_name = type(act).__name__ if isinstance(act, torch.nn.Module) else getattr(act, "__name__", str(act))
    skip = " skip" if tc.skip_connection else ""
    line = (f"ok   {cfg['model_kind']} {type(tc).__name__} {act_name}{skip} L={tc.n_layers} {folder} "
            f"max|df|={worst_df:.2e} max|dout|={worst_dx:.2e}")
    if graph:
        line += " " + _graph(loaded["cache-eager"], x.shape[-1])
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--no-graph", action="store_true", help="skip the replacement-model + attribute step")
    p.add_argument("--traceback", action="store_true", help="print the traceback of unexpected errors")
    a = p.parse_args(argv)

    import circuit_tracer

    # attribute's backward hooks warn that no input needs a gradient: expected there, and noise here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(1)
    print(f"circuit_tracer {circuit_tracer.__version__}, torch {torch.__version__}, rtol={a.rtol:g} atol={a.atol:g}")
    n_fail = 0
    for folder in a.folders:
        folder = folder.resolve()
        try:
            line = check_folder(folder, a.rtol, a.atol, graph=not a.no_graph)
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
