"""Tiny random-weight models and tiny datasets, built in-process: tests run offline in seconds."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue and or it was is to of in "
         "he she they we you i".split())


def make_tiny_model(folder: Path, n_layer: int = 2, d_model: int = 32, n_ctx: int = 64, seed: int = 0) -> Path:
    """A random-weight GPT-2 with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                     eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=n_ctx, n_embd=d_model, n_layer=n_layer,
                     n_head=4, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def vocab_size(tiny_model) -> int:
    return len(json.loads((tiny_model / "tokenizer.json").read_text())["model"]["vocab"])


def write_token_dataset(folder: Path, n_docs: int, doc_len: int, vocab: int, seed: int = 0) -> Path:
    """A `save_to_disk` dataset with a `tokens` column of random ids (BOS id 0 never drawn)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, vocab, (n_docs, doc_len), generator=g).tolist()
    datasets.Dataset.from_dict({"tokens": toks}).save_to_disk(str(folder))
    return folder


@pytest.fixture
def token_dataset(tmp_path, vocab_size) -> Path:
    return write_token_dataset(tmp_path / "tokens_ds", n_docs=40, doc_len=100, vocab=vocab_size)


@pytest.fixture
def text_dataset(tmp_path) -> Path:
    """A jsonl file of random sentences in the tiny tokenizer's words."""
    import random

    rng = random.Random(0)
    path = tmp_path / "text.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))}) + "\n")
    return path


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread gains nothing, and on a busy machine every op waits for the
    descheduled one (measured on a recovery test: 2 s alone, over 60 s beside another process
    with 2 threads; 2 s with 1). Test modules of tiny SAEs use it with `pytestmark`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole module, its module-scoped fixtures (harvests, trained runs) included:
    requested with `pytestmark`, it is set up before them. For modules whose data is built once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
