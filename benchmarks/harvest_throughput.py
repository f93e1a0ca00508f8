"""Benchmark: harvest tokens/s vs the bare forward-to-hook tokens/s, same model, same batches.

    python benchmarks/harvest_throughput.py                  # random gelu-2l-shaped model
    python benchmarks/harvest_throughput.py --model smollm2-135m   # the packaged real model

Prints both figures and their ratio (target: harvest >= 0.8 of the bare forward).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def gelu2l_shaped(folder: Path) -> Path:
    """A random-weight GPT-2 with gelu-2l's shape (2 layers, d_model 512, vocab 48262)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import make_tiny_model  # the tokenizer comes from the test helper

    make_tiny_model(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=48262, n_positions=1024, n_embd=512, n_layer=2, n_head=8,
                     activation_function="gelu_new", bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def token_dataset(folder: Path, n_tokens: int, vocab: int) -> Path:
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, vocab, (n_tokens // 1024 + 2, 1024), generator=g).tolist()
    datasets.Dataset.from_dict({"tokens": rows}).save_to_disk(str(folder))
    return folder


def bare_forward(model, batches: list[torch.Tensor], hook: str, stop: int | None) -> float:
    with torch.inference_mode():
        model.run_with_cache(batches[0], names_filter=[hook], stop_at_layer=stop)  # warm-up
        start = time.perf_counter()
        for b in batches:
            _, cache = model.run_with_cache(b, names_filter=[hook], stop_at_layer=stop,
                                            return_cache_object=False)
            cache[hook].to("cpu")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name/folder [random gelu-2l-shaped]")
    p.add_argument("--hook", default="blocks.0.hook_mlp_out")
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    from harvest.config import HarvestConfig
    from harvest.run import harvest
    from shared.device import pick_device
    from shared.models import load_model, stop_at_layer

    device = str(pick_device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_name = args.model or str(gelu2l_shaped(tmp / "model"))
        model = load_model(model_name, device, args.dtype)
        vocab = model.cfg.d_vocab
        ds = token_dataset(tmp / "ds", args.tokens, vocab)
        n_batches = args.tokens // (args.batch_size * args.context_size)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(1, vocab, (args.batch_size, args.context_size), generator=g).to(device)
                   for _ in range(n_batches)]
        bare = bare_forward(model, batches, args.hook, stop_at_layer([args.hook]))
        del model
        cfg = HarvestConfig(hooks=[args.hook], model=model_name, dataset=str(ds),
                            context_size=args.context_size, batch_size=args.batch_size,
                            tokens=n_batches * args.batch_size * args.context_size,
                            out=str(tmp / "dump"), device=device, model_dtype=args.dtype)
        full = harvest(cfg, log=lambda s: None, progress=False).tokens_per_s
    name = args.model or "random gelu-2l-shaped (2L, d_model 512, vocab 48262)"
    print(f"model: {name}; hook {args.hook}; device {device}; batch {args.batch_size} x {args.context_size}; "
          f"{n_batches * args.batch_size * args.context_size:,} tokens")
    print(f"bare forward-to-hook : {bare:10,.0f} tokens/s")
    print(f"harvest (end to end) : {full:10,.0f} tokens/s   (tokenize + forward + shard writes; model load excluded)")
    print(f"ratio harvest / bare : {full / bare:.2f}   (target >= 0.80)")


if __name__ == "__main__":
    main()
