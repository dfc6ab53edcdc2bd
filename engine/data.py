"""Training data for long-context fine-tuning.

Four layers, each usable on its own:

* tokenizers: ``ByteTokenizer`` (no download, 259 ids) and ``load_tokenizer`` for a local HF tokenizer;
* datasets: ``SyntheticDataset`` (long-range recall tasks generated from a seed) and file datasets
  (jsonl / parquet / text) that are either packed into ``seq_len`` blocks or truncated and padded;
* batching: ``DataStream``, an endless, data-parallel, exactly resumable batch iterator;
* ``build_dataset``, which maps a config section onto the above.

Every sample is a dict of three 1-D ``torch.long`` tensors of length ``seq_len``:
``input_ids``, ``labels`` and ``attention_mask``. ``labels`` are *aligned* with ``input_ids`` (HF
convention: the model / loss shifts them by one); positions that must not contribute to the loss hold
``IGNORE_INDEX`` (-100).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "IGNORE_INDEX",
    "SYNTHETIC_TASKS",
    "FILE_KINDS",
    "Tokenizer",
    "ByteTokenizer",
    "load_tokenizer",
    "SyntheticDataset",
    "PackedDataset",
    "PaddedDataset",
    "load_file_dataset",
    "check_vocab",
    "collate",
    "DataStream",
    "build_dataset",
]

IGNORE_INDEX = -100
Sample = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What this module needs from a tokenizer; ``ByteTokenizer`` and HF tokenizers both fit."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus three special tokens.

    Needs no files, so tests and synthetic runs work offline with any model whose vocabulary has at
    least ``vocab_size`` (259) entries.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    _special_names = {256: "<pad>", 257: "<bos>", 258: "<eos>"}

    def __len__(self) -> int:
        # HF tokenizers report their full size (added tokens included) through len().
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # ``add_special_tokens`` mirrors the HF signature so callers can treat both kinds alike; it
        # defaults to False here because the data code adds bos/eos itself.
        ids = list(text.encode("utf-8"))
        if add_special_tokens:
            ids = [self.bos_token_id, *ids, self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        parts: list[str] = []
        run = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i not in self._special_names:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside 0..{self.vocab_size - 1}")
            # Decode the byte run collected so far; "replace" because truncation can split a multi-byte
            # character and decoding must not fail on model output.
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                parts.append(self._special_names[i])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> ``ByteTokenizer``; otherwise ``spec`` must be a local directory holding an HF tokenizer.

    Only local files are used (``local_files_only=True``): training nodes usually have no network, and a
    silent download of a different tokenizer revision would corrupt the data.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"tokenizer {spec!r} is neither 'byte' nor an existing local directory")
    from transformers import AutoTokenizer  # imported lazily: slow, and not needed for "byte"

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # The configured model_max_length (often 2K..8K) is meaningless for long-context training and only
    # makes ``encode`` log a misleading "sequence is too long" warning; sequence length is seq_len's job.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` without special tokens, as int64."""
    if isinstance(tokenizer, ByteTokenizer):
        # Fast path: documents can be megabytes long, and a list of Python ints is ~10x slower here.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)


def _pad_id(tokenizer: Tokenizer) -> int:
    # Many causal-LM tokenizers have no pad token. The pad id is masked out of attention and loss, so
    # any in-vocabulary id works; eos is the conventional stand-in.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _wrap_doc(tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """bos + ids + eos, leaving out whichever special token the tokenizer lacks (e.g. Qwen has no bos)."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return np.concatenate([np.asarray(head, np.int64), ids, np.asarray(tail, np.int64)])


def _check_seq_len(seq_len: int) -> None:
    # One token has nothing to predict after the causal shift.
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


# ----------------------------------------------------------------------------------------------------
# Synthetic long-range tasks
# ----------------------------------------------------------------------------------------------------

SYNTHETIC_TASKS = ("kv_recall", "passkey")

# Keys and values of kv_recall are drawn from this alphabet; the filler is lowercase words only, so the
# markers "=", ";", "?" and ":" occur nowhere else and the query is unambiguous.
_KV_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_KV_LEN = 4
_FILLER_WORDS = 512
_FILLER_SEED = 0x5EC0  # fixed: the filler vocabulary is part of the task definition, not of the run seed


class SyntheticDataset(Dataset):
    """Long-range recall tasks whose answer sits at the very end and depends on the very beginning.

    ``kv_recall``: ``<bos>k3f9=ab12;x0qz=7hd1;...\\n`` + filler + ``\\n?k3f9:`` + ``ab12``
    ``passkey``:   ``<bos>`` + filler + `` The pass key is 48213. Remember it.`` (starting within the
    first 10% of the sequence) + filler + `` What is the pass key? The pass key is `` + ``48213``

    Only the answer tokens carry labels, so the loss measures the long-range dependency alone. Samples
    are exactly ``seq_len`` long and are generated lazily: sample ``i`` depends only on ``(seed, i)``,
    so a 1M-token dataset costs no memory and any access order gives the same data
    (about 0.1-0.2 s per 1M-token sample on one CPU core).

    Random strings (keys, values, digits) are tokenized one character at a time. With the byte
    tokenizer that changes nothing; with a BPE tokenizer it keeps the set of ids the dataset can emit
    small and known in advance (see ``max_token_id``), at the price of a slightly unnatural tokenization.
    """

    def __init__(
        self,
        task: str,
        seq_len: int,
        num_samples: int,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        num_pairs: int = 4,
    ) -> None:
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; expected one of {SYNTHETIC_TASKS}")
        _check_seq_len(seq_len)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")  # numpy's SeedSequence rejects negatives
        if task == "kv_recall" and not 1 <= num_pairs <= 1000:
            raise ValueError(f"num_pairs must be in 1..1000, got {num_pairs}")
        self.task = task
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed
        self.num_pairs = num_pairs
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if self.tokenizer.bos_token_id is None:
            raise ValueError("SyntheticDataset needs a tokenizer with a bos token")
        self._bos = np.asarray([self.tokenizer.bos_token_id], np.int64)

        self._pieces: dict[str, np.ndarray] = {}
        self._chars = {c: self._piece(c) for c in _KV_ALPHABET}
        self._build_filler_vocab()

        needed = self._fixed_len_bound()
        if seq_len < needed:
            raise ValueError(
                f"seq_len {seq_len} is too short for synthetic task {task!r}: needs at least {needed}"
            )

    # -- tokenized building blocks -------------------------------------------------------------------

    def _piece(self, text: str) -> np.ndarray:
        if text not in self._pieces:
            ids = _encode(self.tokenizer, text)
            if ids.size == 0:
                raise ValueError(f"tokenizer encodes {text!r} to no tokens; cannot build the synthetic task")
            self._pieces[text] = ids
        return self._pieces[text]

    def _spell(self, s: str) -> np.ndarray:
        return np.concatenate([self._chars[c] for c in s])

    def _build_filler_vocab(self) -> None:
        # A fixed pool of pseudo-words, each tokenized once as " word". Filler is then sampled in token
        # space by gathering whole words, which is fast enough for 1M-token samples.
        rng = np.random.default_rng(_FILLER_SEED)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(_FILLER_WORDS)]
        encoded = [_encode(self.tokenizer, " " + w) for w in words]
        self._word_lens = np.asarray([e.size for e in encoded], np.int64)
        self._word_starts = np.concatenate([[0], np.cumsum(self._word_lens)[:-1]])
        self._word_flat = np.concatenate(encoded)

    def _filler(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Exactly ``n`` filler tokens (the last word may be cut)."""
        if n <= 0:
            return np.empty(0, np.int64)
        mean_len = float(self._word_lens.mean())
        chosen: list[np.ndarray] = []
        have = 0
        while have < n:
            idx = rng.integers(0, _FILLER_WORDS, size=int((n - have) / mean_len) + 8)
            chosen.append(idx)
            have += int(self._word_lens[idx].sum())
        idx = np.concatenate(chosen)
        lens = self._word_lens[idx]
        # Vectorised gather of the chosen words' tokens: position j of the output reads
        # word_flat[start_of_its_word + offset_within_word].
        out_starts = np.cumsum(lens) - lens
        gather = np.arange(int(lens.sum())) + np.repeat(self._word_starts[idx] - out_starts, lens)
        return self._word_flat[gather[:n]]

    def _fixed_len_bound(self) -> int:
        """Upper bound on the non-filler tokens of a sample, so short seq_len fails at construction."""
        longest_char = max(c.size for c in self._chars.values())
        if self.task == "kv_recall":
            pair = 2 * _KV_LEN * longest_char + self._piece("=").size + self._piece(";").size
            query = self._piece("\n?").size + _KV_LEN * longest_char + self._piece(":").size
            return 1 + self.num_pairs * pair + self._piece("\n").size + query + _KV_LEN * longest_char
        digits = 5 * longest_char
        return (
            1
            + self._piece(" The pass key is ").size
            + digits
            + self._piece(". Remember it.").size
            + self._piece(" What is the pass key? The pass key is ").size
            + digits
        )

    # -- samples -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        # The task is part of the seed so that two tasks with the same seed do not share filler.
        rng = np.random.default_rng((self.seed, SYNTHETIC_TASKS.index(self.task), index))
        if self.task == "kv_recall":
            ids, answer_len = self._kv_recall(rng)
        else:
            ids, answer_len = self._passkey(rng)
        assert ids.size == self.seq_len, (ids.size, self.seq_len)
        input_ids = torch.from_numpy(ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-answer_len:] = input_ids[-answer_len:]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}

    def _kv_recall(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        base = len(_KV_ALPHABET)

        def to_str(code: int) -> str:
            return "".join(_KV_ALPHABET[(code // base**k) % base] for k in range(_KV_LEN))

        # Distinct keys, so the query has exactly one correct answer; values may repeat.
        keys = [to_str(int(c)) for c in rng.choice(base**_KV_LEN, size=self.num_pairs, replace=False)]
        values = [to_str(int(c)) for c in rng.integers(0, base**_KV_LEN, size=self.num_pairs)]
        q = int(rng.integers(0, self.num_pairs))
        header = [self._bos]
        for k, v in zip(keys, values, strict=True):
            header += [self._spell(k), self._piece("="), self._spell(v), self._piece(";")]
        header.append(self._piece("\n"))
        query = [self._piece("\n?"), self._spell(keys[q]), self._piece(":")]
        answer = self._spell(values[q])
        fixed = sum(p.size for p in header) + sum(p.size for p in query) + answer.size
        filler = self._filler(rng, self.seq_len - fixed)
        return np.concatenate([*header, filler, *query, answer]), answer.size

    def _passkey(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        key = self._spell(str(int(rng.integers(10_000, 100_000))))
        intro = [self._piece(" The pass key is "), key, self._piece(". Remember it.")]
        question = self._piece(" What is the pass key? The pass key is ")
        fixed = 1 + sum(p.size for p in intro) + question.size + key.size
        free = self.seq_len - fixed
        # The intro starts within the first 10% of the sequence (never past the available filler).
        before = int(rng.integers(0, max(0, min(self.seq_len // 10 - 1, free)) + 1))
        parts = [
            self._bos,
            self._filler(rng, before),
            *intro,
            self._filler(rng, free - before),
            question,
            key,
        ]
        return np.concatenate(parts), key.size

    def max_token_id(self) -> int:
        """Largest id any sample can contain (exact set: bos, fixed pieces, characters, filler words)."""
        candidates = [self._bos, self._word_flat, *self._pieces.values()]
        return int(max(int(c.max()) for c in candidates))

    @property
    def source(self) -> str:
        return f"synthetic task {self.task!r}"


# ----------------------------------------------------------------------------------------------------
# File datasets
# ----------------------------------------------------------------------------------------------------

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

        # datasets reports a zero-row parquet file only as a generic DatasetGenerationError.
        if pq.ParquetFile(file).metadata.num_rows == 0:
            raise ValueError(f"parquet data file {str(file)!r} has no rows")
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


class _TokenStore(Dataset):
    """Shared part of the file datasets: flat token storage, document offsets, vocabulary lookups."""

    def __init__(self, tokens: torch.Tensor, doc_offsets: torch.Tensor, seq_len: int, source: str) -> None:
        _check_seq_len(seq_len)
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.seq_len = seq_len
        self.source = source

    @property
    def num_documents(self) -> int:
        return self.doc_offsets.numel() - 1

    def max_token_id(self) -> int:
        return int(self.tokens.max())

    def locate_token(self, token_id: int) -> int:
        """Index of the first document containing ``token_id`` (for error messages)."""
        pos = int((self.tokens == token_id).nonzero()[0, 0])
        return int(torch.searchsorted(self.doc_offsets, pos, right=True)) - 1


class PackedDataset(_TokenStore):
    """All documents concatenated (each as bos + text + eos) and cut into ``seq_len`` blocks.

    The remainder after the last full block is dropped. Attention is not masked at document
    boundaries (standard packing); bos/eos tell the model where a new document starts.
    """

    def __init__(self, tokens: torch.Tensor, doc_offsets: torch.Tensor, seq_len: int, source: str) -> None:
        super().__init__(tokens, doc_offsets, seq_len, source)
        self.num_blocks = tokens.numel() // seq_len
        if self.num_blocks == 0:
            raise ValueError(f"{source}: data has {tokens.numel()} tokens, fewer than seq_len {seq_len}")

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> Sample:
        if not -self.num_blocks <= index < self.num_blocks:
            raise IndexError(f"index {index} out of range for {self.num_blocks} blocks")
        index %= self.num_blocks
        input_ids = self.tokens[index * self.seq_len : (index + 1) * self.seq_len].long()
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "attention_mask": torch.ones_like(input_ids),
        }


class PaddedDataset(_TokenStore):
    """One document per sample: truncated to ``seq_len``, right-padded with ``pad_id``.

    Padding gets ``labels == IGNORE_INDEX`` and ``attention_mask == 0``.
    """

    def __init__(
        self, tokens: torch.Tensor, doc_offsets: torch.Tensor, seq_len: int, pad_id: int, source: str
    ) -> None:
        super().__init__(tokens, doc_offsets, seq_len, source)
        self.pad_id = pad_id
        lengths = doc_offsets[1:] - doc_offsets[:-1]
        self._any_padding = bool((lengths < seq_len).any())

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> Sample:
        n = self.num_documents
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} documents")
        index %= n
        start = int(self.doc_offsets[index])
        end = min(int(self.doc_offsets[index + 1]), start + self.seq_len)
        doc = self.tokens[start:end].long()
        length = doc.numel()
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        input_ids[:length] = doc
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        labels[:length] = doc
        attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
        attention_mask[:length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def max_token_id(self) -> int:
        # The pad id counts: masked positions still go through the embedding lookup, and an
        # out-of-range index there is a device-side assert on GPU, not a clean error.
        top = super().max_token_id()
        return max(top, self.pad_id) if self._any_padding else top

    def locate_token(self, token_id: int) -> int:
        if token_id == self.pad_id and token_id > super().max_token_id():
            lengths = self.doc_offsets[1:] - self.doc_offsets[:-1]
            return int((lengths < self.seq_len).nonzero()[0, 0])
        return super().locate_token(token_id)


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


def check_vocab(dataset: Dataset, vocab_size: int) -> None:
    """Raise ValueError if any token id of ``dataset`` is >= ``vocab_size`` (the model's embedding rows).

    Out-of-range ids otherwise surface as a device-side assert deep inside the embedding on GPU.
    Datasets of this module answer in O(1)/one vectorised pass; other datasets are scanned sample by sample.
    """
    max_token_id = getattr(dataset, "max_token_id", None)
    if max_token_id is not None:
        top = max_token_id()
    else:
        top = max(int(dataset[i]["input_ids"].max()) for i in range(len(dataset)))  # type: ignore[arg-type]
    if top < vocab_size:
        return
    source = getattr(dataset, "source", type(dataset).__name__)
    where = ""
    if isinstance(dataset, _TokenStore):
        where = f" (first in document {dataset.locate_token(top)})"
    raise ValueError(
        f"{source}: token id {top}{where} is outside the model vocabulary (vocab_size={vocab_size}); "
        "does the tokenizer belong to this model?"
    )


# ----------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Stack equally shaped samples into a batch (all our samples are exactly seq_len long)."""
    if not samples:
        raise ValueError("collate: no samples")
    keys = samples[0].keys()
    for s in samples:
        if s.keys() != keys:
            raise ValueError(f"collate: samples have different keys: {sorted(keys)} vs {sorted(s.keys())}")
    try:
        return {k: torch.stack([s[k] for s in samples]) for k in keys}
    except RuntimeError as e:
        shapes = {k: [tuple(s[k].shape) for s in samples] for k in keys}
        raise ValueError(f"collate: samples have different shapes: {shapes}") from e


class DataStream:
    """Endless iterator of batches for one data-parallel rank, resumable exactly from ``state_dict``.

    Every epoch draws a permutation of all samples from ``(seed, epoch)``; rank ``r`` of ``W`` takes
    positions ``r, r + W, r + 2W, ...`` of it, so ranks are disjoint and, together, cover the epoch.
    All ranks get the same number of batches per epoch (``len(dataset) // W // batch_size``) so they
    never disagree about epoch boundaries, which would deadlock collectives; the up to
    ``W * batch_size - 1`` samples left over are different ones each epoch.

    The state is just ``(epoch, position)`` (position = batches already taken in this epoch) and is the
    same on every rank, so one rank's saved state resumes all of them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.samples_per_rank = self.num_samples // world_size
        self.batches_per_epoch = self.samples_per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset has {self.num_samples} samples: {self.samples_per_rank} per rank with "
                f"world_size={world_size}, fewer than batch_size={batch_size}, so an epoch has no batch"
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    def _rank_order(self) -> np.ndarray:
        """This rank's sample indices for the current epoch (cached: a permutation of 1M ids is ~10 ms)."""
        if self._order_epoch != self.epoch:
            if self.shuffle:
                perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples)
            self._order = perm[self.rank :: self.world_size][: self.samples_per_rank]
            self._order_epoch = self.epoch
        return self._order

    def indices(self) -> list[int]:
        """Sample indices of the next batch, without advancing."""
        start = self.position * self.batch_size
        return [int(i) for i in self._rank_order()[start : start + self.batch_size]]

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = collate([self.dataset[i] for i in self.indices()])
        # Advance only after the batch was built, so a failure leaves the state pointing at it.
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return batch

    def state_dict(self) -> dict[str, int | bool]:
        # The configuration is saved too, so resuming with a different one fails loudly instead of
        # silently producing different batches.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(f"DataStream state is missing {missing}")
        differ = {
            k: (state[k], mine[k])
            for k in ("seed", "batch_size", "world_size", "num_samples", "shuffle")
            if state[k] != mine[k]
        }
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"cannot resume the data stream exactly; configuration changed ({detail})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"invalid DataStream state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


# ----------------------------------------------------------------------------------------------------
# Config entry point
# ----------------------------------------------------------------------------------------------------


def build_dataset(data_cfg: Any, tokenizer: Tokenizer, vocab_size: int | None = None) -> Dataset:
    """Dataset for a config section with ``kind, path, text_field, seq_len, packing, num_samples,
    synthetic_task, seed``.

    ``num_samples`` and ``synthetic_task`` apply to ``kind == "synthetic"`` only; file data uses every
    document (``num_samples`` is ignored), and ``seed`` there only matters to ``DataStream``'s shuffling.
    If ``vocab_size`` (the model's) is given, ``check_vocab`` runs on the result.
    """
    kind = data_cfg.kind
    if kind == "synthetic":
        dataset: Dataset = SyntheticDataset(
            data_cfg.synthetic_task, data_cfg.seq_len, data_cfg.num_samples, data_cfg.seed, tokenizer
        )
    elif kind in FILE_KINDS:
        if not data_cfg.path:
            raise ValueError(f"data kind {kind!r} needs a path")
        dataset = load_file_dataset(
            kind,
            data_cfg.path,
            tokenizer,
            seq_len=data_cfg.seq_len,
            packing=data_cfg.packing,
            text_field=data_cfg.text_field,
        )
    else:
        raise ValueError(f"unknown data kind {kind!r}; expected 'synthetic' or one of {sorted(FILE_KINDS)}")
    if vocab_size is not None:
        check_vocab(dataset, vocab_size)
    return dataset
