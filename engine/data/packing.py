"""Token stores cut into ``seq_len`` rows: packed (documents concatenated) or padded (one per row)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from engine.data.tokenizers import IGNORE_INDEX, Sample, check_seq_len, wrap_index


class TokenStore(Dataset):
    """Shared part of the file datasets: flat token storage, document offsets, vocabulary lookups."""

    def __init__(self, tokens: torch.Tensor, doc_offsets: torch.Tensor, seq_len: int, source: str) -> None:
        check_seq_len(seq_len)
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.seq_len = seq_len
        self.source = source
        self.notes: list[
            str
        ] = []  # what of the source was not read (engine/data/readers.py), for the summary

    @property
    def num_documents(self) -> int:
        return self.doc_offsets.numel() - 1

    def max_token_id(self) -> int:
        return int(self.tokens.max())

    def locate_token(self, token_id: int) -> int:
        """Index of the first document containing ``token_id`` (for error messages)."""
        pos = int((self.tokens == token_id).nonzero()[0, 0])
        return int(torch.searchsorted(self.doc_offsets, pos, right=True)) - 1


class PackedDataset(TokenStore):
    """All documents concatenated (each as bos + text + eos) and cut into ``seq_len`` blocks.

    The remainder after the last full block is dropped (counted in ``dropped_tokens``). Documents keep to themselves: `position_ids`
    restart at 0 where a document starts (and at a block's start, for a document continued from the
    previous block), which chunkwise_backward turns into document masks (engine/documents.py), so no
    document attends to another one and no token is trained to predict the next document's first.
    """

    def __init__(self, tokens: torch.Tensor, doc_offsets: torch.Tensor, seq_len: int, source: str) -> None:
        super().__init__(tokens, doc_offsets, seq_len, source)
        self.num_blocks = tokens.numel() // seq_len
        self.dropped_tokens = tokens.numel() - self.num_blocks * seq_len
        if self.num_blocks == 0:
            raise ValueError(f"{source}: data has {tokens.numel()} tokens, fewer than seq_len {seq_len}")

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> Sample:
        index = wrap_index(index, self.num_blocks, "blocks")
        start = index * self.seq_len
        input_ids = self.tokens[start : start + self.seq_len].long()
        at = torch.arange(start, start + self.seq_len)
        doc = torch.searchsorted(self.doc_offsets, at, right=True) - 1
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": at - self.doc_offsets[doc].clamp(min=start),
        }

    def row_lengths(self) -> torch.Tensor:
        """Real tokens of every row: all of them (packed rows are full)."""
        return torch.full((self.num_blocks,), self.seq_len, dtype=torch.long)


class PaddedDataset(TokenStore):
    """One document per row, right-padded with ``pad_id`` to ``seq_len``. A document longer than ``seq_len``
    is split into consecutive rows of at most ``seq_len`` tokens (``truncation`` split: every token is
    trained on, each piece as a sequence of its own) or left out (drop: counted in ``dropped_tokens``).

    Padding gets ``labels == IGNORE_INDEX`` and ``attention_mask == 0``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        doc_offsets: torch.Tensor,
        seq_len: int,
        pad_id: int,
        source: str,
        truncation: str = "split",
    ) -> None:
        super().__init__(tokens, doc_offsets, seq_len, source)
        assert truncation in ("split", "drop", "error")
        self.pad_id = pad_id
        starts, ends = doc_offsets[:-1], doc_offsets[1:]
        lengths = ends - starts
        long = lengths > seq_len
        self.long_documents = int(long.sum())
        if truncation == "drop":
            self.dropped_tokens = int(lengths[long].sum())
            starts, ends = starts[~long], ends[~long]
            if starts.numel() == 0:
                raise ValueError(
                    f"{source}: every document is longer than seq_len {seq_len} (data.truncation: drop)"
                )
        else:
            assert truncation == "split" or not bool(long.any()), "the reader refuses long documents"
            self.dropped_tokens = 0
        pieces = -(-(ends - starts) // seq_len)  # rows per document
        first = torch.repeat_interleave(starts, pieces)
        k = torch.arange(int(pieces.sum())) - torch.repeat_interleave(
            torch.cumsum(pieces, 0) - pieces, pieces
        )
        self.row_start = first + k * seq_len
        self.row_end = torch.minimum(self.row_start + seq_len, torch.repeat_interleave(ends, pieces))
        self._any_padding = bool((self.row_end - self.row_start < seq_len).any())

    def __len__(self) -> int:
        return self.row_start.numel()

    def __getitem__(self, index: int) -> Sample:
        index = wrap_index(index, len(self), "rows")
        start, end = int(self.row_start[index]), int(self.row_end[index])
        doc = self.tokens[start:end].long()
        length = doc.numel()
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        input_ids[:length] = doc
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        labels[:length] = doc
        attention_mask = torch.zeros(self.seq_len, dtype=torch.long)
        attention_mask[:length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def row_lengths(self) -> torch.Tensor:
        """Real tokens of every row (the rest is padding)."""
        return self.row_end - self.row_start

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
