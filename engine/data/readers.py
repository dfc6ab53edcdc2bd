"""Records from what users keep: files, directories of shards, `save_to_disk` directories and hub dataset ids,
all read by HF ``datasets`` (its packaged builders and ``load_from_disk``; nothing parsed by hand).

``open_sources(path, format)`` resolves ``path`` into ``Source``s, one per file (a file's errors name it):

* a file: its format from ``data.format``, else from its extension (``.jsonl .json .parquet .csv .txt .md
  .arrow``; any other extension is refused, naming the formats);
* a ``save_to_disk`` directory (``state.json`` or ``dataset_dict.json`` inside): one source, split ``train``
  of a DatasetDict;
* any other directory: the files ``datasets`` resolves for its ``train`` split: the hub's layout
  (``data/train-00000-of-00002.parquet``, ``train.jsonl``...) or, without split names, every file;
* a path that does not exist but reads as a hub id (``name`` or ``owner/name``): ``load_dataset(id)``, which
  uses the local HF cache; offline and not cached, the error names the id and how to make it local.

Packaged builders never touch the network but write an Arrow copy of each file to a cache: a private
temporary directory (``cache_dir``), deleted by the caller once the records are used, because the shared
default cache keys files by path and metadata (an in-place edit that keeps size and mtime would be read
stale).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.file_checks import check_utf8
from engine.hub import HUB_ID

FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "text", "arrow")
_BUILDER = {
    "jsonl": "json",
    "json": "json",
    "parquet": "parquet",
    "csv": "csv",
    "text": "text",
    "arrow": "arrow",
}
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".arrow": "arrow",
}


@dataclass
class Source:
    """One file (or a save_to_disk dataset, or a hub dataset) and its records as a ``datasets.Dataset``."""

    name: str  # the file, directory or hub id, as error messages name it
    format: str
    dataset: Any  # datasets.Dataset

    def where(self, record: int) -> str:
        """Where record ``record`` (0-based) is: the 1-based line for jsonl (what editors show)."""
        if self.format == "jsonl":
            line = _jsonl_line(Path(self.name), record)
            if line is not None:
                return f"{self.name}, line {line}"
        return f"{self.name}, record {record} (0-based)"


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide datasets' per-file progress bars (every rank would print them) and its error logs (a file it
    cannot read is logged before it raises; the raised error is reported, once, naming the file)."""
    import datasets
    from datasets.utils import logging as ds_logging

    was_enabled, verbosity = datasets.is_progress_bar_enabled(), ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()


def open_sources(
    path: str, fmt: str, cache_dir: str, what: str = "data.path", notes: list[str] | None = None
) -> list[Source]:
    """The sources ``path`` stands for (see the module docstring), each read by ``datasets``. ``notes`` gets a
    line for what of ``path`` is not read (the files of other splits), for the data summary."""
    p = Path(path)
    with quiet_datasets():
        if p.is_file():
            return [_read_file(p, *_file_format(p, fmt, what), cache_dir, what)]
        if p.is_dir():
            if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
                return [_read_saved(p, what)]
            return [
                _read_file(f, *_file_format(f, fmt, what), cache_dir, what)
                for f in _split_files(p, what, notes if notes is not None else [])
            ]
        if is_hub_id(path):
            return [_read_hub(path, what)]
    raise ValueError(f"{what}: not found: {path!r} (expected a data file, a directory or a hub dataset id)")


def is_hub_id(path: str) -> bool:
    """Whether a path that does not exist is to be read as a hub dataset id rather than reported missing."""
    return bool(HUB_ID.match(path)) and Path(path).suffix.lower() not in _EXTENSIONS


def _file_format(file: Path, fmt: str, what: str) -> tuple[str, str]:
    """The file's format and why it is expected (for error messages)."""
    if fmt != "auto":
        return fmt, f"expected {fmt}, as data.kind or data.format says"
    found = _EXTENSIONS.get(file.suffix.lower())
    if found is None:
        raise ValueError(
            f"{what} file {str(file)!r}: cannot tell its format from the extension; set data.format to one of "
            f"{', '.join(FORMATS[1:])} (extensions: {', '.join(_EXTENSIONS)})"
        )
    return found, f"expected {found} from the extension {file.suffix}; set data.format if it is another"


def _split_files(directory: Path, what: str, notes: list[str]) -> list[Path]:
    """The files of the directory's train split as ``datasets`` resolves them (hub layout or all files); the
    other splits' files are named in ``notes``."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(directory))
    except Exception:  # datasets raises EmptyDatasetError for a directory without data files
        raise ValueError(f"{what}: directory {str(directory)!r} contains no data files") from None
    files = DataFilesDict.from_local_or_remote(patterns, base_path=str(directory))
    if "train" not in files:
        raise ValueError(
            f"{what}: directory {str(directory)!r} has no train split (splits found: {sorted(files)}); "
            "point data.path at the split's files"
        )
    others = {split: len(names) for split, names in files.items() if split != "train"}
    if others:
        left = ", ".join(f"{n} file(s) of split {split!r}" for split, n in sorted(others.items()))
        notes.append(f"{directory}: the train split's {len(files['train'])} file(s) read; {left} left out")
    return [Path(f) for f in sorted(files["train"])]


def _read_file(file: Path, fmt: str, expected: str, cache_dir: str, what: str) -> Source:
    from datasets import Dataset, load_dataset

    name = str(file)
    if file.stat().st_size == 0:
        # Checked up front: datasets' json builder fails on an empty file with a bare StopIteration.
        raise ValueError(f"{what} file {name!r} is empty ({expected})")
    if fmt in ("jsonl", "json", "csv", "text"):  # datasets' own decode error names neither file nor place
        try:
            check_utf8(file, f"{what} file")
        except ValueError as e:
            raise ValueError(f"{e} ({expected})") from None
    if fmt == "parquet":
        # Checked here: datasets reports a zero-row file only as "Instruction 'train' corresponds to no data".
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except Exception as e:  # pyarrow's ArrowInvalid and others; the message does not name the file
            raise ValueError(
                f"{what} file {name!r} is not a readable parquet file ({expected}): {e}"
            ) from None
        if rows == 0:
            raise ValueError(f"{what} file {name!r} has no records")
    extra = {"sample_by": "document"} if fmt == "text" else {}
    try:
        if fmt == "arrow":
            ds = Dataset.from_file(name, in_memory=False)
        else:
            ds = load_dataset(_BUILDER[fmt], data_files=name, split="train", cache_dir=cache_dir, **extra)
    except Exception as e:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        cause = e.__cause__ or e
        raise ValueError(
            f"could not read {what} file {name!r} as {fmt} ({expected}): {type(cause).__name__}: {cause}"
        ) from None
    if len(ds) == 0:
        raise ValueError(f"{what} file {name!r} has no records")
    return Source(name, fmt, ds)


def _read_saved(directory: Path, what: str) -> Source:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(directory))
    except Exception as e:
        raise ValueError(
            f"{what}: could not read {str(directory)!r} as a save_to_disk directory: {type(e).__name__}: {e}"
        ) from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{what}: {str(directory)!r} has no train split (splits: {sorted(ds)})")
        ds = ds["train"]
    if len(ds) == 0:
        raise ValueError(f"{what}: {str(directory)!r} has no records")
    return Source(str(directory), "arrow", ds)


def _read_hub(dataset_id: str, what: str) -> Source:
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset_id, split="train")
    except Exception as e:  # ConnectionError offline, DatasetNotFoundError, ...
        raise ValueError(
            f"{what}: {dataset_id!r} is not a local path, and datasets could not load it as a hub dataset id "
            f"({type(e).__name__}: {e}). Offline, make it local first where there is network: "
            f"datasets.load_dataset({dataset_id!r}, split='train').save_to_disk(DIR), then set data.path "
            "to DIR"
        ) from None
    return Source(dataset_id, "hub", ds)


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


def read_records(path: str, fmt: str, what: str, notes: list[str] | None = None) -> list[tuple[str, dict]]:
    """(where, record) of every record under ``path`` (chat / prompt_completion records: they are small);
    ``notes`` as for open_sources."""
    import tempfile

    out: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="seco-datasets-") as cache_dir:
        for source in open_sources(path, fmt, cache_dir, what, notes):
            # A field a record lacks reads as null in Arrow (columns are the union of all records' keys):
            # null fields are left out, so the record reads as written.
            out += [
                (source.where(i), {k: v for k, v in record.items() if v is not None})
                for i, record in enumerate(source.dataset)
            ]
    return out
