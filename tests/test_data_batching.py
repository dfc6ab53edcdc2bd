"""Batches padded to their longest row (data.pad_to: longest) give the gradient of rows padded to seq_len, with
fewer chunks; length-grouped sampling (data.group_by_length) still covers every row, resumes exactly, and
pads less."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import grads_of, rel_error, tiny_model

from engine.chunkwise import chunkwise_backward
from engine.config import DataConfig
from engine.data import ByteTokenizer, DataStream, build_dataset, collate, load_tokenizer
from engine.schedule import ChunkSchedule

SFT = Path(__file__).resolve().parent / "data" / "sft"
TOKENIZER = str(SFT / "tokenizer")


def documents(tmp_path: Path, lengths: list[int]):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": chr(97 + i % 26) * n}) + "\n" for i, n in enumerate(lengths)))
    cfg = DataConfig(kind="documents", path=str(path), seq_len=128, packing=False)
    return build_dataset(cfg, ByteTokenizer())


def sft():
    cfg = DataConfig(
        kind="prompt_completion",
        path=str(SFT / "prompt_completion.jsonl"),
        tokenizer=TOKENIZER,
        seq_len=96,
        packing=False,
    )
    return build_dataset(cfg, load_tokenizer(TOKENIZER))


def run(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    stats = chunkwise_backward(model, **batch, schedule=ChunkSchedule(chunk_size=chunk_size))
    return stats, grads_of(model)


@pytest.mark.parametrize("source", ["documents", "sft"])
def test_longest_row_padding_gives_the_seq_len_gradient_with_fewer_chunks(tmp_path, source):
    ds = documents(tmp_path, [20, 35, 9, 41]) if source == "documents" else sft()
    vocab = 259 if source == "documents" else 400
    model = tiny_model("LlamaConfig", torch.float64, vocab_size=vocab)
    rows = [ds[i] for i in range(4)]
    full, short = collate(rows), collate(rows, pad_to_longest=True)
    longest = max(int(r["attention_mask"].sum()) for r in rows)
    assert short["input_ids"].shape[1] == longest < full["input_ids"].shape[1]
    (a, ga), (b, gb) = run(model, full, 16), run(model, short, 16)
    assert b.num_chunks == -(-longest // 16) < a.num_chunks
    assert a.num_tokens == b.num_tokens and b.loss == pytest.approx(a.loss, rel=1e-12)
    assert rel_error(gb, ga) <= 1e-12
    # Negative control: cutting one real token more changes the gradient.
    cut = {k: v[:, : longest - 1] for k, v in full.items()}
    assert rel_error(run(model, cut, 16)[1], ga) > 1e-6


def test_min_length_keeps_the_budget_chunks(tmp_path):
    ds = documents(tmp_path, [10, 12])
    rows = [ds[0], ds[1]]
    assert collate(rows, pad_to_longest=True)["input_ids"].shape[1] == 14
    assert collate(rows, pad_to_longest=True, min_length=64)["input_ids"].shape[1] == 64
    assert collate(rows, pad_to_longest=True, min_length=1000)["input_ids"].shape[1] == 128


def test_group_by_length_covers_every_row_pads_less_and_resumes(tmp_path):
    lengths = list(np.random.default_rng(0).integers(5, 120, size=96))
    ds = documents(tmp_path, lengths)
    assert ds.row_lengths().tolist() == [n + 2 for n in lengths]

    def epoch(stream):
        batches = [next(stream) for _ in range(stream.batches_per_epoch)]
        ids = sorted(
            int(b["input_ids"][r, 1]) * 1000 + int(b["attention_mask"][r].sum())
            for b in batches
            for r in range(4)
        )
        return batches, ids

    kw = dict(batch_size=4, world_size=2, seed=3, pad_to_longest=True)
    plain = [DataStream(ds, rank=r, **kw) for r in range(2)]
    grouped = [DataStream(ds, rank=r, group_by_length=True, **kw) for r in range(2)]
    (p0, ids_p0), (p1, ids_p1) = epoch(plain[0]), epoch(plain[1])
    (g0, ids_g0), (g1, ids_g1) = epoch(grouped[0]), epoch(grouped[1])
    assert sorted(ids_g0 + ids_g1) == sorted(ids_p0 + ids_p1)  # the same rows, once each, over both ranks
    width = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    assert width(g0) + width(g1) < 0.8 * (width(p0) + width(p1))
    # Exact resume mid-epoch, and a grouped state is refused by an ungrouped stream.
    a = DataStream(ds, rank=0, group_by_length=True, **kw)
    for _ in range(3):
        next(a)
    b = DataStream(ds, rank=0, group_by_length=True, **kw)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(next(a).values(), next(b).values()))
    with pytest.raises(ValueError, match="group_by_length: saved True, now False"):
        DataStream(ds, rank=0, **kw).load_state_dict(a.state_dict())
    old = {k: v for k, v in DataStream(ds, rank=0, **kw).state_dict().items() if k != "group_by_length"}
    DataStream(ds, rank=0, **kw).load_state_dict(old)  # a state saved before the option resumes ungrouped
