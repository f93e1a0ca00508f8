"""Train a few steps of every registered SAE architecture on a tiny dump and write, beside each
final checkpoint, `interop_expected.safetensors`: inputs and our encode/decode of them, for
`check.py` to compare with SAELens' loading of the same folder.

    python scripts/saelens_interop/train_tiny.py OUT_DIR     # prints the checkpoint folders

Runs in this project's venv (never in the SAELens one). Inputs are normalised during training
(`expected_norm`), so the check also covers the scaling folded into the saved weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.dump_writer import write_dump
from shared.saes import ARCHITECTURES, load_sae
from train.arch_settings import without_unused
from train.config import LanguageModelSAERunnerConfig
from train.run import train

SETTINGS = {"standard": dict(l1_coefficient=0.05), "gated": dict(l1_coefficient=0.05),
            "topk": dict(k=4, aux_k=8), "batchtopk": dict(k=4, aux_k=8),
            "matryoshka_batchtopk": dict(k=4, aux_k=8, matryoshka_widths=[16, 64]),
            "jumprelu": dict(l0_coefficient=0.01, jumprelu_init_threshold=0.05)}


def tiny_dump(folder: Path, d_in: int = 32, n_rows: int = 4096) -> None:
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(48, d_in, generator=g), dim=1)
    coefficients = torch.rand(n_rows, 48, generator=g) * (torch.rand(n_rows, 48, generator=g) < 0.06)
    write_dump(folder, 3.0 * coefficients @ directions + 0.5, context_size=64, shard_rows=2048)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tiny_dump(out / "dump")
    for arch in ARCHITECTURES:
        cfg = LanguageModelSAERunnerConfig(
            shards=str(out / "dump"), architecture=arch, expansion_factor=2, train_batch_size=256,
            total_training_tokens=256 * 40, lr=3e-3, normalize_activations="expected_norm",
            b_dec_init_method="mean", eval_holdout_contexts=0, device="cpu", dead_feature_window=10,
            feature_sampling_window=20, checkpoint_path=str(out / arch), **SETTINGS.get(arch, {}))
        cfg = LanguageModelSAERunnerConfig.from_dict(without_unused(cfg))  # e.g. no dead window for jumprelu
        result = train(cfg, progress=False, log=lambda s: None)
        sae = load_sae(result.final)
        x = 3.0 * torch.randn(64, sae.cfg.d_in, generator=torch.Generator().manual_seed(1)) + 0.5
        with torch.no_grad():
            feature_acts = sae.encode(x)
            sae_out = sae.decode(feature_acts)
        save_file({"x": x, "feature_acts": feature_acts.contiguous(), "sae_out": sae_out.contiguous()},
                  str(result.final / "interop_expected.safetensors"))
        print(result.final)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/saelens_interop/train_tiny.py OUT_DIR")
    main(Path(sys.argv[1]))
