"""SFT datasets (data.kind chat / prompt_completion): rendered samples as rows of `seq_len` tokens.

With `data.packing`, consecutive samples share a row as separate documents: each sample's `position_ids`
restart at 0 (HF's packed convention), which `chunkwise_backward(position_ids=...)` turns into document
masks, so samples never attend to each other (engine/documents.py). Without it, one sample per row. Rows are
right-padded; padding carries no label and continues the last document's positions.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import Dataset

from engine.config import DataConfig
from engine.data.chat import (
    Rendered,
    check_chat,
    check_prompt_completion,
    fit,
    render_prompt_completion,
)
from engine.data.chat_format import messages_field, to_messages
from engine.data.chat_render import render_conversation, resolve_template
from engine.data.readers import read_records
from engine.data.tokenizers import IGNORE_INDEX, Sample, Tokenizer, pad_id


def render_samples(
    data_cfg: DataConfig, tokenizer: Tokenizer, path: str, fmt: str, notes: list[str]
) -> tuple[list[Rendered], Counter, int]:
    """Every record of ``path`` validated first (errors name the record and field), then rendered and fitted."""
    records = read_records(path, fmt, f"{data_cfg.kind} data", notes)
    if data_cfg.kind == "chat":
        field = messages_field(data_cfg.chat_format, data_cfg.messages_field)
        fmt_args = (field, data_cfg.chat_format, data_cfg.chat_keys, data_cfg.chat_roles)
        checked = [(w, check_chat(to_messages(r, *fmt_args), w, field)) for w, r in records]
        template, loss = resolve_template(data_cfg.chat_template), data_cfg.assistant_loss
        rendered = [r for w, m in checked for r in render_conversation(tokenizer, m, w, loss, template)]
    else:
        fields = (data_cfg.prompt_field, data_cfg.completion_field)
        checked = [(w, check_prompt_completion(r, w, *fields)) for w, r in records]
        rendered = [render_prompt_completion(tokenizer, p, c, w) for w, (p, c) in checked]
    samples, dropped, dropped_tokens = [], Counter(), 0
    for s in rendered:
        kept = fit(s, data_cfg.seq_len, data_cfg.truncation)
        if kept is None:
            dropped[f"longer than data.seq_len {data_cfg.seq_len} (data.truncation: drop)"] += 1
            dropped_tokens += len(s.ids)
        else:
            samples.append(kept)
    if not samples:
        raise ValueError(f"data.path: no sample of {path!r} fits data.seq_len {data_cfg.seq_len}")
    return samples, dropped, dropped_tokens


class SftDataset(Dataset):
    """Rows of `seq_len` tokens: one sample each, or (packing) consecutive samples as documents."""

    def __init__(
        self,
        samples: list[Rendered],
        seq_len: int,
        pad_id: int,
        packing: bool,
        source: str,
        dropped: Counter | None = None,
        dropped_tokens: int = 0,
    ):
        self.samples, self.seq_len, self.pad_id, self.packing = samples, seq_len, pad_id, packing
        self.source, self.dropped = source, dropped or Counter()  # reason -> samples dropped
        self.dropped_tokens = dropped_tokens  # the tokens of the samples dropped
        self.notes: list[
            str
        ] = []  # what of the source was not read (engine/data/readers.py), for the summary
        self.rows: list[list[int]] = []
        fill = seq_len + 1
        for i, s in enumerate(samples):
            if packing and fill + len(s.ids) <= seq_len:
                self.rows[-1].append(i)
                fill += len(s.ids)
            else:
                self.rows.append([i])
                fill = len(s.ids)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        ids, labels, pos = [], [], []
        for i in self.rows[index]:
            s = self.samples[i]
            ids += s.ids
            labels += [t if on else IGNORE_INDEX for t, on in zip(s.ids, s.loss)]
            pos += range(len(s.ids))
        n, pad = len(ids), self.seq_len - len(ids)
        row = {
            "input_ids": torch.tensor(ids + [self.pad_id] * pad, dtype=torch.long),
            "labels": torch.tensor(labels + [IGNORE_INDEX] * pad, dtype=torch.long),
            "attention_mask": torch.tensor([1] * n + [0] * pad, dtype=torch.long),
        }
        if self.packing:
            row["position_ids"] = torch.tensor(
                pos + list(range(pos[-1] + 1, pos[-1] + 1 + pad)), dtype=torch.long
            )
        return row

    def row_lengths(self) -> list[int]:
        """Real tokens of every row (the rest is padding)."""
        return [sum(len(self.samples[i].ids) for i in row) for row in self.rows]

    def max_token_id(self) -> int:
        # The pad id counts: padded positions still go through the embedding lookup, and an out-of-range
        # index there is a device-side assert on GPU, not a clean error.
        top = max(max(s.ids) for s in self.samples)
        padded = any(sum(len(self.samples[i].ids) for i in row) < self.seq_len for row in self.rows)
        return max(top, self.pad_id) if padded else top


def build_sft_dataset(
    data_cfg: DataConfig, tokenizer: Tokenizer, path: str | None = None, fmt: str | None = None
) -> SftDataset:
    """The SftDataset of ``path`` (default data.path) read as ``fmt`` (default data.format)."""
    path = path if path is not None else data_cfg.path
    assert path is not None, "DataConfig requires a path or a mixture"
    notes: list[str] = []
    samples, dropped, dropped_tokens = render_samples(
        data_cfg, tokenizer, path, fmt or data_cfg.format, notes
    )
    pad = pad_id(tokenizer)
    dataset = SftDataset(samples, data_cfg.seq_len, pad, data_cfg.packing, str(path), dropped, dropped_tokens)
    dataset.notes = notes
    return dataset
