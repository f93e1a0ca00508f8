"""Train a few steps of every registered SAE architecture SAELens has a class for (all but the
crosscoder and the CLTs: `NO_SAELENS_CLASS`) on a tiny dump, and of every transcoder
SAELens has a class for on a tiny model's MLP (hidden 128 -> output 32), and write, beside each
final checkpoint, `interop_expected.safetensors`: inputs and our encode/decode of them, for
`check.py` to compare with SAELens' loading of the same folder.

    python scripts/saelens_interop/train_tiny.py OUT_DIR     # prints the checkpoint folders

Runs in this project's venv (never in the SAELens one). Inputs (and a transcoder's targets) are
normalised during training (`expected_norm`), so the check also covers the scaling folded into
the saved weights.

The transcoders (standard, standard + skip, jumprelu, jumprelu + skip, batchtopk, which saves as
jumprelu_transcoder) are trained through the real `train` path on two dumps of one harvest pass
of a random-weight one-layer GPT-2 (`blocks.0.mlp.hook_post` -> `blocks.0.hook_mlp_out`); their x
are rows of the input dump. topk and gated transcoders are left out: SAELens has no class for them.
Expected tensors: x [n, d_in], feature_acts [n, d_sae], sae_out [n, d_out] (our forward, the skip
path included) and `decoded` [n, d_out] (our decode(feature_acts), without the skip path: SAELens'
`decode` leaves it out too).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from harvest.cli import main as harvest_main
from shared.dump_writer import write_dump
from shared.reader import open_dump
from shared.saes import ARCHITECTURES, load_sae
from train.arch_settings import without_unused
from train.config import LanguageModelSAERunnerConfig
from train.run import train

SETTINGS = {"standard": dict(l1_coefficient=0.05), "gated": dict(l1_coefficient=0.05),
            "topk": dict(k=4, aux_k=8), "batchtopk": dict(k=4, aux_k=8),
            "matryoshka_batchtopk": dict(k=4, aux_k=8, matryoshka_widths=[16, 64]),
            "jumprelu": dict(l0_coefficient=0.01, jumprelu_init_threshold=0.05)}

NO_SAELENS_CLASS = {"crosscoder", "jumprelu_clt", "topk_clt"}
"""Registered architectures saved under their own names, for which SAELens 6.54 has no class (a
crosscoder reads and writes several hooks; the CLTs' interop is circuit-tracer's, checked by
scripts/circuit_tracer_interop.sh). Every other registered architecture is trained and checked."""
TRANSCODERS = [("standard", False), ("standard", True), ("jumprelu", False), ("jumprelu", True),
               ("batchtopk", False)]
"""(architecture, skip_connection) of the transcoders checked: those SAELens 6.54 loads
(transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder)."""
MLP_IN, MLP_OUT = "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"  # 128 and 32 wide in the tiny model
WORDS = "the a cat dog sat on mat ran fast slow big small red blue and or it was is to of in he she they".split()


def tiny_dump(folder: Path, d_in: int = 32, n_rows: int = 4096) -> None:
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(48, d_in, generator=g), dim=1)
    coefficients = torch.rand(n_rows, 48, generator=g) * (torch.rand(n_rows, 48, generator=g) < 0.06)
    write_dump(folder, 3.0 * coefficients @ directions + 0.5, context_size=64, shard_rows=2048)


def tiny_mlp_pair(folder: Path, tokens: int = 12000) -> tuple[Path, Path]:
    """One harvest pass of a random-weight one-layer GPT-2 (d_model 32, MLP 128, a word-level
    tokenizer) over random token ids: the dumps of its MLP's hidden activations and output."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    model = folder / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(model)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(model)
    ids = torch.randint(1, len(vocab), (200, 100), generator=torch.Generator().manual_seed(0))
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"tokens": ids.tolist()}).save_to_disk(str(folder / "tokens"))
    with contextlib.redirect_stdout(sys.stderr):  # harvest prints its dumps; stdout lists the checkpoints
        harvest_main(["--quiet", "--model", str(model), "--dataset", str(folder / "tokens"), "--out",
                      str(folder / "dumps"), "--context-size", "32", "--batch-size", "8", "--tokens",
                      str(tokens), "--shard-rows", "4096", "--skip-bos", "--hook", MLP_IN, "--hook", MLP_OUT],
                     standalone_mode=False)
    return folder / "dumps" / MLP_IN, folder / "dumps" / MLP_OUT


def train_tiny(out: Path, name: str, shards: Path, arch: str, **settings) -> Path:
    """A few steps of `arch` through `train`, as the CLI runs it; the final checkpoint."""
    cfg = LanguageModelSAERunnerConfig(
        shards=str(shards), architecture=arch, expansion_factor=2, train_batch_size=256,
        total_training_tokens=256 * 40, lr=3e-3, normalize_activations="expected_norm",
        b_dec_init_method="mean", eval_holdout_contexts=0, device="cpu", dead_feature_window=10,
        feature_sampling_window=20, checkpoint_path=str(out / name), **SETTINGS.get(arch, {}), **settings)
    cfg = LanguageModelSAERunnerConfig.from_dict(without_unused(cfg))  # e.g. no dead window for jumprelu
    return train(cfg, progress=False, log=lambda s: None).final


def write_expected(final: Path, x: torch.Tensor) -> None:
    """Our encode, decode and forward of x, beside the checkpoint (`decoded` without the skip path)."""
    sae = load_sae(final)
    with torch.no_grad():
        feature_acts = sae.encode(x)
        decoded = sae.decode(feature_acts)
        sae_out = sae(x).sae_out
    save_file({"x": x.contiguous(), "feature_acts": feature_acts.contiguous(), "sae_out": sae_out.contiguous(),
               "decoded": decoded.contiguous()}, str(final / "interop_expected.safetensors"))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tiny_dump(out / "dump")
    for arch in (a for a in ARCHITECTURES if a not in NO_SAELENS_CLASS):
        final = train_tiny(out, arch, out / "dump", arch)
        d_in = load_sae(final).cfg.d_in
        write_expected(final, 3.0 * torch.randn(64, d_in, generator=torch.Generator().manual_seed(1)) + 0.5)
        print(final)
    mlp_in, mlp_out = tiny_mlp_pair(out / "mlp")
    dump = open_dump(mlp_in)
    x = dump.activations(dump.n_rows - 64, dump.n_rows).float()  # raw MLP hidden activations
    for arch, skip in TRANSCODERS:
        name = f"{arch}_{'skip_' if skip else ''}transcoder"
        final = train_tiny(out, name, mlp_in, arch, target_shards=str(mlp_out), skip_connection=skip)
        write_expected(final, x)
        print(final)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/saelens_interop/train_tiny.py OUT_DIR")
    main(Path(sys.argv[1]))
