"""Train a cross-layer transcoder and per-layer transcoders a few steps on a tiny model's real
activations, export them with `export-to circuit-tracer`, and write, beside each exported folder,
what our loaded checkpoints compute, for `check.py` to compare with circuit-tracer's loading of
the same folder.

    python scripts/circuit_tracer_interop/train_tiny.py OUT_DIR     # prints the exported folders

Runs in this project's venv (never in the circuit-tracer one). `make_tiny.py` checks the folder
writer on synthetic tensors; this checks the whole path a user takes:

  1. one harvest pass of a random-weight two-layer GPT-2 (d_model 32, a word-level tokenizer)
     records `blocks.{0,1}.mlp.hook_in` (what each MLP reads, ln2's output) and
     `blocks.{0,1}.hook_mlp_out`;
  2. the real `train` CLI trains, a few steps each with `--normalize-activations expected_norm`
     (so the scaling folded into the saved weights is exercised): a jumprelu_clt over both layers,
     a JumpReLU transcoder per layer, and a ReLU skip transcoder (standard --skip-connection) per
     layer;
  3. the real `export-to circuit-tracer` writes the CLT (one final folder) and the two per-layer
     sets (layer 0's final folder first) in circuit-tracer's form;
  4. `interop_expected.safetensors` beside each exported folder holds x [L, n, d] (rows of the
     raw input dumps, the same positions at every layer), feature_acts [L, n, F] and out [L, n, d]
     from OUR checkpoints loaded with `shared.saes.load_sae(final)`: the CLT's encode of both
     layers' inputs concatenated and its decode, split per layer; each transcoder's own encode and
     forward (the skip path included: circuit-tracer's decode takes the input for it).

The folders' hooks are mlp.hook_in -> hook_mlp_out, which check.py's random-weight TransformerLens
replacement model resolves (circuit-tracer wraps every block's MLP with hook_in/hook_out), so the
attribution-graph step runs on these folders too.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

EXPECTED_FILE = "interop_expected.safetensors"
N_LAYERS = 2
HOOKS_IN = [f"blocks.{layer}.mlp.hook_in" for layer in range(N_LAYERS)]
HOOKS_OUT = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]
N_ROWS = 48  # positions in interop_expected
WORDS = "the a cat dog sat on mat ran fast slow big small red blue and or it was is to of in he she they".split()
COMMON = ["--quiet", "--device", "cpu", "--train-batch-size", "256", "--total-training-tokens", str(256 * 30),
          "--normalize-activations", "expected_norm", "--b-dec-init-method", "mean", "--eval-holdout-contexts", "0",
          "--n-checkpoints", "0", "--lr", "0.003", "--seed", "0"]
JUMPRELU = ["--l0-coefficient", "0.01", "--jumprelu-init-threshold", "0.05"]


def _quietly(main, args: list[str]) -> None:
    """A click command as its console script runs it, its stdout sent to stderr (ours lists folders)."""
    with contextlib.redirect_stdout(sys.stderr):
        main(args, standalone_mode=False)


def harvest_tiny(folder: Path, tokens: int = 12000) -> tuple[list[Path], list[Path]]:
    """One harvest pass of a random-weight two-layer GPT-2: ([mlp.hook_in dumps], [hook_mlp_out dumps]).
    Its weights are drawn 10x wider than GPT-2's default (initializer_range 0.2), so the MLP
    outputs are about 1 rather than 1e-3, and the check's atol of 1e-5 is a tight one."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from harvest.cli import main as harvest_main

    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    model = folder / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=N_LAYERS, n_head=4,
                               initializer_range=0.2, bos_token_id=0, eos_token_id=0)).save_pretrained(model)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(model)
    ids = torch.randint(1, len(vocab), (200, 100), generator=torch.Generator().manual_seed(0))
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"tokens": ids.tolist()}).save_to_disk(str(folder / "tokens"))
    hooks = [h for pair in zip(HOOKS_IN, HOOKS_OUT) for h in pair]
    _quietly(harvest_main, ["--quiet", "--model", str(model), "--dataset", str(folder / "tokens"), "--out",
                            str(folder / "dumps"), "--context-size", "32", "--batch-size", "8", "--tokens",
                            str(tokens), "--shard-rows", "4096", "--skip-bos",
                            *(a for h in hooks for a in ("--hook", h))])
    return [folder / "dumps" / h for h in HOOKS_IN], [folder / "dumps" / h for h in HOOKS_OUT]


def train_tiny(out: Path, name: str, inputs: list[Path], targets: list[Path], *args: str) -> Path:
    """A few steps through the `train` CLI; the final checkpoint."""
    from train.cli import main as train_main

    _quietly(train_main, ["--shards", ",".join(map(str, inputs)), "--target-shards", ",".join(map(str, targets)),
                          "--checkpoint-path", str(out / "runs" / name), *COMMON, *args])
    return out / "runs" / name / "final"


def export(finals: list[Path], folder: Path) -> Path:
    from train.export import main as export_main

    _quietly(export_main, ["circuit-tracer", *map(str, finals), "--out", str(folder)])
    return folder


def _usable_rows(f: torch.Tensor) -> torch.Tensor:
    """Positions where every layer has an active feature (circuit-tracer's sparse decode sizes its
    output by the last position with one), as a mask over n; f: [L, n, F]."""
    return (f != 0).any(dim=-1).all(dim=0)


def save_expected(folder: Path, x: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    keep = _usable_rows(f).nonzero().flatten()[:N_ROWS]
    if len(keep) < N_ROWS // 2:
        raise SystemExit(f"{folder}: only {len(keep)} positions have an active feature at every layer")
    x, f, out = x[:, keep], f[:, keep], out[:, keep]
    assert bool((f == 0).any()), f"{folder}: no inactive feature: the activation is not exercised"
    save_file({"x": x.contiguous(), "feature_acts": f.contiguous(), "out": out.contiguous()},
              str(folder / EXPECTED_FILE))


def clt_expected(final: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our CLT on x [L, n, d]: (feature_acts [L, n, F], out [L, n, d]), split per layer."""
    from shared.saes import load_sae

    sae = load_sae(final)
    L, n, _ = x.shape
    with torch.no_grad():
        f = sae.encode(x.permute(1, 0, 2).reshape(n, -1))   # [n, L * F], layer-major features
        out = sae.decode(f)                                 # [n, L * d_out], layer-major outputs
    return f.reshape(n, L, -1).permute(1, 0, 2), out.reshape(n, L, -1).permute(1, 0, 2)


def plt_expected(finals: list[Path], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's own transcoder on x[layer]: (feature_acts [L, n, F], out [L, n, d])."""
    from shared.saes import load_sae

    feats, outs = [], []
    with torch.no_grad():
        for layer, final in enumerate(finals):
            sae = load_sae(final)
            feats.append(sae.encode(x[layer]))
            outs.append(sae(x[layer]).sae_out)  # decode + the skip path, if any
    return torch.stack(feats), torch.stack(outs)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    from shared.reader import open_dump

    inputs, targets = harvest_tiny(out / "model")
    dumps = [open_dump(p) for p in inputs]
    n = dumps[0].n_rows
    x = torch.stack([d.activations(n - 4 * N_ROWS, n).float() for d in dumps])  # raw, same positions

    clt = train_tiny(out, "clt", inputs, targets, "--architecture", "jumprelu_clt", "--d-sae", "128", *JUMPRELU)
    folders = [(export([clt], out / "ct" / "clt_jumprelu_trained"), clt_expected(clt, x))]
    for name, args in (("plt_jumprelu_trained", ["--architecture", "jumprelu", *JUMPRELU]),
                       ("plt_relu_skip_trained", ["--architecture", "standard", "--skip-connection",
                                                  "--l1-coefficient", "0.05"])):
        finals = [train_tiny(out, f"{name}_{layer}", [inputs[layer]], [targets[layer]], "--expansion-factor", "2",
                             *args) for layer in range(N_LAYERS)]
        folders.append((export(finals, out / "ct" / name), plt_expected(finals, x)))
    for folder, (f, y) in folders:
        save_expected(folder, x, f, y)
        print(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/circuit_tracer_interop/train_tiny.py OUT_DIR")
    main(Path(sys.argv[1]))
