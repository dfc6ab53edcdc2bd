"""Document datasets: documents in any format engine/data/readers.py reads, tokenized once into a flat store."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.packing import PackedDataset, PaddedDataset
from engine.data.readers import Source, open_sources
from engine.data.tokenizers import Tokenizer, check_seq_len, encode_text, pad_id, wrap_doc

# Document kinds and the format each implies ("documents" reads data.format). "text" reads ONE DOCUMENT PER
# FILE: long-context data is usually whole books / repositories / papers, whose paragraphs are separated by
# blank lines, so splitting on blank lines would destroy exactly the long-range structure we train on.
FILE_KINDS = {"documents": "auto", "jsonl": "jsonl", "parquet": "parquet", "text": "text"}


def _texts(source: Source, text_field: str) -> Iterator[str | Any]:
    """The raw text values of one source, in record order (not yet validated)."""
    ds = source.dataset
    field = "text" if source.format == "text" else text_field
    if field not in ds.column_names:
        raise ValueError(
            f"{source.format} data {source.name!r} has no field {field!r} (data.text_field); "
            f"its fields are {ds.column_names}"
        )
    for batch in ds.select_columns([field]).iter(batch_size=1024):
        yield from batch[field]


def _document(tokenizer: Tokenizer, text: Any, where: str, text_field: str) -> np.ndarray:
    """bos + tokens + eos of one record's text, or a ValueError naming the record and field."""
    if text is None:
        raise ValueError(f"{where}: field {text_field!r} is missing or null")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    if not text.strip():
        raise ValueError(f"{where}: document is empty")
    ids = wrap_doc(tokenizer, encode_text(tokenizer, text))
    if ids.size < 2:
        raise ValueError(f"{where}: document has {ids.size} token(s), fewer than 2")
    return ids


def _tokenize(
    sources: list[Source], text_field: str, tokenizer: Tokenizer, too_long: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one flat int32 token tensor plus document offsets (len = num_docs + 1).

    One flat tensor instead of a list of tensors: millions of small tensors cost far more memory than
    their data, and int32 halves it again (every vocabulary fits). ``too_long``: a document of more tokens
    is an error (data.truncation: error).
    """
    chunks: list[np.ndarray] = []
    offsets = [0]
    for source in sources:
        for record, text in enumerate(_texts(source, text_field)):
            ids = _document(tokenizer, text, f"data file {source.where(record)}", text_field)
            if too_long is not None and ids.size > too_long:
                raise ValueError(
                    f"data file {source.where(record)}: document of {ids.size} tokens, more than data.seq_len "
                    f"{too_long} (data.truncation: error; split makes several rows of it, drop skips it)"
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
    format: str = "auto",
    truncation: str = "split",
) -> PackedDataset | PaddedDataset:
    """Read documents from ``path`` (engine/data/readers.py: a file, a directory of shards, a save_to_disk
    directory or a hub id) and tokenize them, each as bos + text + eos.

    ``kind`` jsonl / parquet / text fixes the format; ``documents`` takes ``format`` (auto: from the file
    extensions). Without packing, ``truncation`` says what becomes of a document longer than ``seq_len``:
    split (several rows), drop (counted) or error. The builders' Arrow copies go to a private temporary
    directory deleted once the documents are tokenized; pass ``cache_dir`` to put them on a disk with more
    room than /tmp (then left in place).
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(FILE_KINDS)}")
    if truncation not in ("split", "drop", "error"):
        raise ValueError(f"data.truncation: {truncation!r} is not one of split, drop, error for documents")
    fmt = FILE_KINDS[kind] if kind != "documents" else format
    check_seq_len(seq_len)
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="seco-datasets-"))
        notes: list[str] = []
        sources = open_sources(str(path), fmt, cache_dir, what=f"{kind} data", notes=notes)
        too_long = seq_len if truncation == "error" and not packing else None
        tokens, offsets = _tokenize(sources, text_field, tokenizer, too_long)
    source = f"{kind} data {str(path)!r}"
    if packing:
        dataset: PackedDataset | PaddedDataset = PackedDataset(tokens, offsets, seq_len, source)
    else:
        dataset = PaddedDataset(tokens, offsets, seq_len, pad_id(tokenizer), source, truncation)
    dataset.notes = notes
    return dataset
