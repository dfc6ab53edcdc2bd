"""File datasets: jsonl / parquet / text read through HF ``datasets``, tokenized once into a flat store."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.packing import PackedDataset, PaddedDataset
from engine.data.tokenizers import Tokenizer, _check_seq_len, _encode, _pad_id, _wrap_doc
from engine.file_checks import check_utf8

# Our kind -> HF ``datasets`` packaged builder. "text" uses sample_by="document": ONE DOCUMENT PER FILE.
# Long-context data is usually whole books / repositories / papers, whose paragraphs are separated by
# blank lines, so splitting on blank lines would destroy exactly the long-range structure we train on.
FILE_KINDS = {"jsonl": "json", "parquet": "parquet", "text": "text"}


def _resolve_files(kind: str, path: str | Path) -> list[Path]:
    """A file, or every non-hidden regular file directly inside a directory (sorted, for determinism)."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise ValueError(f"{kind} data directory {str(p)!r} contains no files")
    else:
        raise ValueError(f"{kind} data file not found: {str(p)!r}")
    for f in files:
        if f.stat().st_size == 0:
            # Checked up front: datasets' json builder fails on an empty file with a bare StopIteration.
            raise ValueError(f"{kind} data file {str(f)!r} is empty")
    return files


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' per-file "Generating train split" bars; every rank would print them."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_texts(kind: str, file: Path, text_field: str, cache_dir: str) -> Iterator[str | Any]:
    """The raw text values of one file, in file order (not yet validated)."""
    from datasets import load_dataset  # imported lazily: slow, and synthetic runs do not need it

    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except Exception as e:  # pyarrow's ArrowInvalid and others; the message does not name the file
            raise ValueError(f"parquet data file {str(file)!r} is not a readable parquet file: {e}") from None
        # datasets reports a zero-row parquet file only as a generic DatasetGenerationError.
        if rows == 0:
            raise ValueError(f"parquet data file {str(file)!r} has no rows")
    else:  # datasets' own decode error names neither the file nor the place
        check_utf8(file, f"{kind} data file")
    extra = {"sample_by": "document"} if kind == "text" else {}
    try:
        with _quiet_datasets():
            ds = load_dataset(
                FILE_KINDS[kind], data_files=str(file), split="train", cache_dir=cache_dir, **extra
            )
    except Exception as e:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        raise ValueError(f"could not read {kind} data file {str(file)!r}: {type(e).__name__}: {e}") from e
    field = "text" if kind == "text" else text_field
    if field not in ds.column_names:
        raise ValueError(
            f"{kind} data file {str(file)!r} has no field {field!r}; its fields are {ds.column_names}"
        )
    if len(ds) == 0:
        raise ValueError(f"{kind} data file {str(file)!r} contains no documents")
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        yield from batch[field]


def _jsonl_line(file: Path, record: int) -> int | None:
    """1-based line of the ``record``-th JSON object (datasets skips blank lines); only for error messages."""
    seen = -1
    with open(file, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                seen += 1
                if seen == record:
                    return lineno
    return None


def _where(kind: str, file: Path, record: int) -> str:
    """Location of a record for error messages (the line number only for jsonl, where it differs)."""
    loc = f"{kind} data file {str(file)!r}, record {record} (0-based)"
    line = _jsonl_line(file, record) if kind == "jsonl" else None
    return f"{loc}, line {line}" if line is not None else loc


def _tokenize_files(
    kind: str, files: list[Path], text_field: str, tokenizer: Tokenizer, cache_dir: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one flat int32 token tensor plus document offsets (len = num_docs + 1).

    One flat tensor instead of a list of tensors: millions of small tensors cost far more memory than
    their data, and int32 halves it again (every vocabulary fits).
    """
    chunks: list[np.ndarray] = []
    offsets = [0]
    for file in files:
        for record, text in enumerate(_read_texts(kind, file, text_field, cache_dir)):
            if text is None:
                raise ValueError(f"{_where(kind, file, record)}: field {text_field!r} is missing or null")
            if not isinstance(text, str):
                raise ValueError(
                    f"{_where(kind, file, record)}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            if not text.strip():
                raise ValueError(f"{_where(kind, file, record)}: document is empty")
            ids = _wrap_doc(tokenizer, _encode(tokenizer, text))
            if ids.size < 2:
                raise ValueError(
                    f"{_where(kind, file, record)}: document has {ids.size} token(s), fewer than 2"
                )
            chunks.append(ids)
            offsets.append(offsets[-1] + ids.size)
    flat = torch.from_numpy(np.concatenate(chunks).astype(np.int32))
    return flat, torch.tensor(offsets, dtype=torch.int64)


def load_file_dataset(
    kind: str,
    path: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    packing: bool = True,
    text_field: str = "text",
    cache_dir: str | None = None,
) -> PackedDataset | PaddedDataset:
    """Read jsonl / parquet / text data from ``path`` (a file or a directory of files) and tokenize it.

    Each document becomes bos + text + eos. Reading goes through HF ``datasets``' packaged builders,
    which are part of the library and never touch the network (no HF_DATASETS_OFFLINE needed). They
    still write an Arrow copy of the data to a cache; by default that goes to a private temporary
    directory, deleted once the documents are tokenized, because the shared default cache
    (~/.cache/huggingface/datasets) keys files by path and metadata (an in-place edit that keeps size and mtime
    reads stale data), grows without bound, makes concurrent ranks contend on lock files, and fails on a
    read-only HOME. Pass ``cache_dir`` to put that copy on a disk with more room than /tmp; it is then
    left in place and reused.
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(FILE_KINDS)}")
    _check_seq_len(seq_len)
    files = _resolve_files(kind, path)
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="seco-datasets-"))
        tokens, offsets = _tokenize_files(kind, files, text_field, tokenizer, cache_dir)
    source = f"{kind} data {str(path)!r}"
    if packing:
        return PackedDataset(tokens, offsets, seq_len, source)
    return PaddedDataset(tokens, offsets, seq_len, _pad_id(tokenizer), source)
