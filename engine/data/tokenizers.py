"""The sample format and the tokenizers: ``ByteTokenizer`` (no download, 259 ids) and ``load_tokenizer``
for a local HF tokenizer, with the small token helpers the datasets share.

Every sample is a dict of three 1-D ``torch.long`` tensors of length ``seq_len``: ``input_ids``, ``labels``
and ``attention_mask``. ``labels`` are *aligned* with ``input_ids`` (HF convention: the model / loss shifts
them by one); positions that must not contribute to the loss hold ``IGNORE_INDEX`` (-100).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

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


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Tokenizer:
    """``"byte"`` -> ``ByteTokenizer``; otherwise ``spec`` is a local directory holding an HF tokenizer, or a
    hub id loaded through the local HF cache (engine/hub.py; downloaded unless HF_HUB_OFFLINE is set).

    A directory is read with ``local_files_only=True``: nothing of another revision is fetched. ``trust_remote_code``
    (model.trust_remote_code) is always passed: left unset, transformers asks on stdin whether to run a
    tokenizer directory's own code.
    """
    if spec == "byte":
        return ByteTokenizer()
    from engine.hub import is_hub_id

    path = Path(spec)
    hub = is_hub_id(spec)
    if not path.is_dir() and not hub:
        raise ValueError(f"tokenizer {spec!r} is neither 'byte', an existing local directory nor a hub id")
    from transformers import AutoTokenizer  # imported lazily: slow, and not needed for "byte"

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec if hub else str(path), local_files_only=not hub, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ValueError(
            f"data.tokenizer: {spec!r} holds code of its own (auto_map in tokenizer_config.json), which runs "
            "only with model.trust_remote_code: true"
        ) from None
    # The configured model_max_length (often 2K..8K) is meaningless for long-context training and only
    # makes ``encode`` log a misleading "sequence is too long" warning; sequence length is seq_len's job.
    tokenizer.model_max_length = int(1e30)
    return tokenizer


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` without special tokens, as int64."""
    if isinstance(tokenizer, ByteTokenizer):
        # Fast path: documents can be megabytes long, and a list of Python ints is ~10x slower here.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)


def pad_id(tokenizer: Tokenizer) -> int:
    # Many causal-LM tokenizers have no pad token. The pad id is masked out of attention and loss, so
    # any in-vocabulary id works; eos is the conventional stand-in.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def wrap_doc(tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """bos + ids + eos, leaving out whichever special token the tokenizer lacks (e.g. Qwen has no bos)."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return np.concatenate([np.asarray(head, np.int64), ids, np.asarray(tail, np.int64)])


def wrap_index(index: int, size: int, unit: str) -> int:
    """`index` in [-size, size) as an index in [0, size) (Python's sequence convention), else IndexError."""
    if not -size <= index < size:
        raise IndexError(f"index {index} out of range for {size} {unit}")
    return index % size


def check_seq_len(seq_len: int) -> None:
    # One token has nothing to predict after the causal shift.
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
