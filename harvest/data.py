"""Open a token dataset as a stream of documents, whatever its source, and detect its column."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shared.errors import UserError
from shared.hub import hub_reachable, unreachable
from shared.models import cache_root
from shared.packaged import resolve_dataset_alias

TOKEN_COLUMNS = ("tokens", "input_ids")
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


@dataclass
class DocumentSource:
    """A dataset opened for streaming, and how to read token ids out of it."""

    stream: Any  # datasets.IterableDataset
    column: str
    tokenized: bool
    description: str
    exact_tokens: int | None = None  # known up front for local pretokenized data
    dataset_name: str = ""


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                "dataset_dict.json"))


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
    if not files:
        raise UserError(f"{path} holds no .txt, .jsonl, .json or .parquet files to read")
    kinds = {_BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise UserError(f"{path}: mix of file types {sorted(str(k) for k in kinds)}; "
                        "give one kind of .txt, .jsonl or .parquet files")
    return kinds.pop(), [str(p) for p in files]  # type: ignore[return-value]


def not_utf8(name: str | Path, e: UnicodeDecodeError) -> UserError:
    return UserError(f"{name} is not UTF-8 text ({e.reason}); convert it to UTF-8 "
                     "(e.g. iconv -t UTF-8) or pass a pretokenized dataset")


def _load_local(builder: str, files: list[str], path: Path) -> Any:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    except StopIteration:  # the json builder reads a first record to learn the columns
        raise UserError(f"{path} holds no records; give a dataset with at least one document") from None
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def rows(stream: Any, name: str) -> Iterator[dict[str, Any]]:
    """The stream's rows; undecodable text is the user's to convert, not a crash."""
    try:
        yield from stream
    except UnicodeDecodeError as e:
        raise not_utf8(name, e) from None


def _open_stream(name: str, split: str) -> tuple[Any, str]:
    import datasets

    datasets.disable_progress_bars()  # harvest's own bar covers the work
    local = resolve_dataset_alias(name, cache_root() / "corpora")
    path = Path(local or name)
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{name} has no split '{split}'; it has {', '.join(ds)}")
            ds = ds[split]
        return ds, "saved"
    if path.exists():
        builder, files = _local_files(path)
        return _load_local(builder, files, path), f"{builder} files"
    if not hub_reachable():  # streaming needs the hub: say so now, not after its retries
        raise UserError(unreachable(f"dataset '{name}'", "shakespeare"))
    try:
        # Streaming: only the documents actually consumed are ever downloaded.
        return datasets.load_dataset(name, split=split, streaming=True), "hub"
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not open dataset '{name}' split '{split}' "
                        f"(no network here? pass a local folder or files): {msg}") from None


def _columns(ds: Any, name: str) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names:
        return list(names)
    first = next(rows(ds, name), None)
    if first is None:
        raise UserError("the dataset is empty; give one with at least one document")
    return list(first)


def open_documents(name: str, split: str, text_column: str, seed: int, shuffle: bool,
                   shuffle_buffer: int) -> DocumentSource:
    """Open `name` and decide: pretokenized (`tokens`/`input_ids`) or raw text (`text_column`)."""
    ds, kind = _open_stream(name, split)
    columns = _columns(ds, name)
    token_col = next((c for c in TOKEN_COLUMNS if c in columns), None)
    if token_col is None and text_column not in columns:
        raise UserError(f"dataset '{name}' has neither a tokens/input_ids column nor text column "
                        f"'{text_column}' (it has: {', '.join(columns)}); pass --text-column")
    exact = None
    if kind == "saved" and token_col is not None:
        lengths = ds.map(lambda b: {"_n": [len(t) for t in b[token_col]]}, batched=True,
                         input_columns=None, remove_columns=ds.column_names, keep_in_memory=True)
        exact = int(sum(lengths["_n"]))
    stream = ds.to_iterable_dataset() if kind == "saved" else ds
    if shuffle:
        # A seeded buffer, for datasets stored in order (by source, by date...).
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    column = token_col or text_column
    what = f"pretokenized column '{column}'" if token_col else f"raw text column '{column}'"
    return DocumentSource(stream=stream, column=column, tokenized=token_col is not None,
                          description=f"{name} ({kind}): {what}", exact_tokens=exact,
                          dataset_name=name)


def iter_token_docs(source: DocumentSource, tokenizer: Any, batch_docs: int = 64) -> Iterator[list[int]]:
    """Yield each document's token ids; raw text is tokenized in batches (fast tokenizers)."""
    if source.tokenized:
        for row in rows(source.stream, source.dataset_name):
            yield list(row[source.column])
        return
    if tokenizer is None:
        raise UserError("the dataset is raw text but the model has no tokenizer; use a tokenized dataset")
    pending: list[str] = []
    for row in rows(source.stream, source.dataset_name):
        pending.append(row[source.column] or "")
        if len(pending) == batch_docs:
            yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
            pending = []
    if pending:
        yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
