"""The circuit-tracer writer (shared/saes/circuit_tracer_form.py), checked without circuit-tracer:
the files, tensor names, shapes and config.yaml keys that circuit-tracer 0.5's loaders read
(`load_transcoder_set`/`load_relu_transcoder` and `load_clt`, reached through
`load_transcoders_from_cache`), and the one-line refusals of what it cannot express.
scripts/circuit_tracer_interop.sh proves the same folders load in circuit-tracer itself."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from shared.errors import UserError
from shared.saes.circuit_tracer_form import write_clt, write_transcoder_set

D, F = 8, 12


def _plt_layer(g, jumprelu=False, skip=False, d_in=D, d_out=D, d_sae=F):
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_out, generator=g), "b_dec": torch.randn(d_out, generator=g)}
    if jumprelu:
        t["threshold"] = torch.rand(d_sae, generator=g)
    if skip:
        t["W_skip"] = torch.randn(d_out, d_in, generator=g)
    return t


def _clt(g, n_layers=3, jumprelu=True):
    t = {"W_enc": torch.randn(n_layers, D, F, generator=g), "b_enc": torch.randn(n_layers, F, generator=g),
         "b_dec": torch.randn(n_layers, D, generator=g)}
    for i in range(n_layers):
        t[f"W_dec_{i}"] = torch.randn(F, n_layers - i, D, generator=g)
    if jumprelu:
        t["threshold"] = torch.rand(n_layers, F, generator=g)
    return t


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


HOOKS = dict(model_name="gpt2", input_hook="hook_resid_mid", output_hook="hook_mlp_out")


@pytest.mark.parametrize("jumprelu,skip", [(False, False), (True, False), (True, True)])
def test_transcoder_set_is_circuit_tracers_form(tmp_path, jumprelu, skip):
    g = torch.Generator().manual_seed(0)
    layers = [_plt_layer(g, jumprelu, skip) for _ in range(3)]
    folder = write_transcoder_set(tmp_path / "plt", layers, **HOOKS, activation="jumprelu" if jumprelu else "relu")
    assert _files(folder) == {"config.yaml", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"}
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg == {"model_kind": "transcoder_set", "model_name": "gpt2", "feature_input_hook": "hook_resid_mid",
                   "feature_output_hook": "hook_mlp_out", "scan": "plt"}
    for layer, ours in enumerate(layers):
        t = _read(folder / f"layer_{layer}.safetensors")
        want = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"activation_function.threshold"} if jumprelu else set()) \
            | ({"W_skip"} if skip else set())
        assert set(t) == want
        # circuit-tracer: pre = F.linear(x, W_enc, b_enc), so W_enc is [d_sae, d_model]
        assert torch.equal(t["W_enc"], ours["W_enc"].T) and t["W_enc"].shape == (F, D)
        assert torch.equal(t["W_dec"], ours["W_dec"]) and t["W_dec"].shape == (F, D)
        assert torch.equal(t["b_enc"], ours["b_enc"]) and torch.equal(t["b_dec"], ours["b_dec"])
        if jumprelu:
            assert torch.equal(t["activation_function.threshold"], ours["threshold"])
        if skip:  # circuit-tracer adds x @ W_skip.T: ours [d_out, d_in] as it is
            assert torch.equal(t["W_skip"], ours["W_skip"])
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in t.values())


def test_clt_is_circuit_tracers_form(tmp_path):
    g = torch.Generator().manual_seed(1)
    ours = _clt(g, n_layers=3)
    folder = write_clt(tmp_path / "clt", ours, model_name="gpt2", input_hook="ln2.hook_normalized",
                       output_hook="hook_mlp_out", activation="jumprelu")
    assert _files(folder) == {"config.yaml"} | {f"W_{k}_{i}.safetensors" for k in ("enc", "dec") for i in range(3)}
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    assert cfg["model_name"] == "gpt2"
    for i in range(3):
        enc = _read(folder / f"W_enc_{i}.safetensors")
        assert set(enc) == {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
        assert enc[f"W_enc_{i}"].shape == (F, D) and torch.equal(enc[f"W_enc_{i}"], ours["W_enc"][i].T)
        assert torch.equal(enc[f"b_enc_{i}"], ours["b_enc"][i]) and torch.equal(enc[f"b_dec_{i}"], ours["b_dec"][i])
        assert torch.equal(enc[f"threshold_{i}"], ours["threshold"][i]) and enc[f"threshold_{i}"].shape == (F,)
        dec = _read(folder / f"W_dec_{i}.safetensors")
        assert set(dec) == {f"W_dec_{i}"}
        assert dec[f"W_dec_{i}"].shape == (F, 3 - i, D) and torch.equal(dec[f"W_dec_{i}"], ours[f"W_dec_{i}"])


def test_clt_relu_has_no_threshold_and_decoders_may_come_as_a_list(tmp_path):
    g = torch.Generator().manual_seed(2)
    ours = _clt(g, n_layers=2, jumprelu=False)
    listed = {k: v for k, v in ours.items() if not k.startswith("W_dec_")} | {"W_dec": [ours["W_dec_0"], ours["W_dec_1"]]}
    folder = write_clt(tmp_path / "clt", listed, **HOOKS, activation="relu")
    assert set(_read(folder / "W_enc_0.safetensors")) == {"W_enc_0", "b_enc_0", "b_dec_0"}
    assert torch.equal(_read(folder / "W_dec_1.safetensors")["W_dec_1"], ours["W_dec_1"])


def test_bfloat16_stays_bfloat16(tmp_path):
    g = torch.Generator().manual_seed(3)
    layer = {k: v.to(torch.bfloat16) for k, v in _plt_layer(g).items()}
    folder = write_transcoder_set(tmp_path / "plt", [layer], **HOOKS, activation="relu")
    assert {v.dtype for v in _read(folder / "layer_0.safetensors").values()} == {torch.bfloat16}


def test_rewrite_replaces_the_folder_whole(tmp_path):
    g = torch.Generator().manual_seed(4)
    folder = write_transcoder_set(tmp_path / "plt", [_plt_layer(g) for _ in range(3)], **HOOKS, activation="relu")
    write_transcoder_set(folder, [_plt_layer(g) for _ in range(2)], **HOOKS, activation="relu")
    # a stale layer_2 would make circuit-tracer load three layers
    assert _files(folder) == {"config.yaml", "layer_0.safetensors", "layer_1.safetensors"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def _refusal(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line(tmp_path):
    g = torch.Generator().manual_seed(5)
    out = tmp_path / "x"
    plt = lambda layers, **kw: write_transcoder_set(out, layers, **{**HOOKS, "activation": "relu", **kw})  # noqa: E731
    assert "relu and jumprelu" in _refusal(lambda: plt([_plt_layer(g)], activation="topk"))
    assert "one width" in _refusal(lambda: plt([_plt_layer(g, d_out=D + 1)]))
    assert "no threshold" in _refusal(lambda: plt([_plt_layer(g)], activation="jumprelu"))
    assert "threshold was given" in _refusal(lambda: plt([_plt_layer(g, jumprelu=True)]))
    assert "every layer or in none" in _refusal(lambda: plt([_plt_layer(g, skip=True), _plt_layer(g)]))
    assert "same shape" in _refusal(lambda: plt([_plt_layer(g), _plt_layer(g, d_sae=F + 1)]))
    assert "give 'hook_mlp_out'" in _refusal(lambda: plt([_plt_layer(g)], output_hook="blocks.3.hook_mlp_out"))
    assert "give 'hook_resid_mid'" in _refusal(lambda: plt([_plt_layer(g)], input_hook="blocks.{layer}.hook_resid_mid"))
    assert "no place for b_pre" in _refusal(lambda: plt([{**_plt_layer(g), "b_pre": torch.zeros(D)}]))
    assert "shape" in _refusal(lambda: plt([{**_plt_layer(g), "b_enc": torch.zeros(F + 1)}]))
    assert "at least one" in _refusal(lambda: plt([]))

    clt = lambda t, **kw: write_clt(out, t, **{**HOOKS, "activation": "jumprelu", **kw})  # noqa: E731
    assert "skip connection" in _refusal(lambda: clt({**_clt(g), "W_skip": torch.zeros(3, D, D)}))
    assert "relu and jumprelu" in _refusal(lambda: clt(_clt(g), activation="topk"))
    assert "missing decoder W_dec_2" in _refusal(lambda: clt({k: v for k, v in _clt(g).items() if k != "W_dec_2"}))
    assert "W_dec_1 has shape" in _refusal(lambda: clt({**_clt(g), "W_dec_1": torch.zeros(F, 3, D)}))
    assert "one width" in _refusal(lambda: clt({**_clt(g), "b_dec": torch.zeros(3, D + 1)}))
    assert not out.exists()

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sae_weights.safetensors").write_bytes(b"precious")
    assert "not a circuit-tracer folder" in _refusal(
        lambda: write_transcoder_set(tmp_path / "run", [_plt_layer(g)], **HOOKS, activation="relu"))
    assert (tmp_path / "run" / "sae_weights.safetensors").read_bytes() == b"precious"
