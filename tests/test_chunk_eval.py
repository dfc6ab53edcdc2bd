"""Chunk-wise scoring (engine/chunk_eval.py) against a plain full-sequence forward, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_batch, tiny_model

from engine.chunk_eval import score
from engine.options import ChunkOptions


def plain(model, ids, labels, mask=None, position_ids=None):
    """HF's loss, summed, and the argmax hits per row, from one full forward (float64 logits kept)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    hits = ((logits.argmax(-1) == targets) & (targets != -100)).sum(1)
    return ce.item(), int((targets != -100).sum()), hits


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [8, 16, 37])
def test_loss_equals_plain_forward(fused, chunk):
    model = tiny_model("LlamaConfig", torch.float64).eval()
    ids, labels, mask = tiny_batch()
    ref, n, _ = plain(model, ids, labels, mask)
    got = score(
        model,
        ids,
        labels=labels,
        attention_mask=mask,
        chunk_size=chunk,
        options=ChunkOptions(fused_loss=fused),
    )
    assert got.num_tokens == n
    assert got.loss_sum == pytest.approx(ref, rel=1e-12)


def test_argmax_hits_equal_plain_forward():
    model = tiny_model("LlamaConfig", torch.float64).eval()
    ids, labels, mask = tiny_batch()
    with torch.no_grad():
        preds = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    # Every other target is the model's own (teacher-forced) prediction: those are hits, the rest misses.
    labels[:, 1::2] = torch.where(labels[:, 1::2] == -100, -100, preds[:, 0:-1:2])
    ref, _, hits = plain(model, ids, labels, mask)
    assert 10 <= int(hits.min()) and int(hits.sum()) < 61
    got = score(model, ids, labels=labels, attention_mask=mask, chunk_size=8, argmax=True)
    assert got.loss_sum == pytest.approx(ref, rel=1e-12)
    assert torch.equal(got.row_correct, hits) and got.row_tokens.tolist() == [32, 29]


def test_packed_rows_score_as_documents_alone():
    model = tiny_model("LlamaConfig", torch.float64).eval()
    ids, _, _ = tiny_batch(batch=1, seq=40, pad_from=None, ignore=())
    pos = torch.cat([torch.arange(25), torch.arange(15)]).unsqueeze(0)
    got = score(model, ids, position_ids=pos, chunk_size=8)
    a, na, _ = plain(model, ids[:, :25], ids[:, :25])
    b, nb, _ = plain(model, ids[:, 25:], ids[:, 25:])
    assert got.num_tokens == na + nb
    assert got.loss_sum == pytest.approx(a + b, rel=1e-12)
