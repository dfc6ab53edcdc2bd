"""Packed rows with document boundaries: a packed row's gradient is the sum of its documents' gradients, each
document run alone (same global token normalisation); positions restart per document (HF's convention)."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, grads_of, packed_positions, per_document_grads, rel_error, tiny_model

from engine.chunkwise import ChunkSchedule, chunkwise_backward

FAMILIES = {"LlamaConfig": {}, "Qwen2Config": {}, "Phi3Config": {"num_key_value_heads": 4}}
# Row 0: four documents with boundaries inside chunks (chunk 8) and 4 padding tokens; row 1: a boundary
# exactly at a chunk start (16).
DOCS = [[7, 12, 5, 9], [16, 21]]
SEQ = 37


def packed_batch(docs=DOCS, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(docs), seq), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for b, lengths in enumerate(docs):
        mask[b, sum(lengths) :] = 0
    ids, labels = ids.masked_fill(mask == 0, 0), labels.masked_fill(mask == 0, -100)
    labels[0, 9:12] = -100  # a prompt-like span without loss inside document 1
    return ids, labels, mask, packed_positions(docs, seq)


def per_document_reference(model, ids, labels, docs=DOCS):
    return per_document_grads(model, ids, labels, docs)


def packed_grads(model, ids, labels, mask, pos, **kw):
    model.zero_grad(set_to_none=True)
    stats = chunkwise_backward(model, ids, labels=labels, attention_mask=mask, position_ids=pos, **kw)
    return stats, grads_of(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_row_equals_its_documents_one_by_one(family):
    model = tiny_model(family, torch.float64, **FAMILIES[family])
    ids, labels, mask, pos = packed_batch()
    ref_loss, total, ref = per_document_reference(model, ids, labels)
    for schedule in (
        ChunkSchedule(chunk_size=8),
        ChunkSchedule(chunk_size=8, mode="spaco", sample_prob=1.0),
    ):
        stats, got = packed_grads(model, ids, labels, mask, pos, schedule=schedule)
        err = rel_error(got, ref)
        print(f"{family} {schedule.mode}: packed vs documents one by one, relative error {err:.2e}")
        assert err <= 1e-12
        assert stats.num_tokens == total  # no target across a document boundary
        assert stats.loss == pytest.approx(ref_loss, rel=1e-12)
    # Without position_ids the same row lets documents see each other: the test can tell.
    model.zero_grad(set_to_none=True)
    chunkwise_backward(model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=8))
    assert rel_error(grads_of(model), ref) > 1e-3


def test_documents_ending_at_chunk_starts_need_no_kv_gradient():
    """Every boundary on a chunk start: no chunk reads an earlier chunk's K/V, so no K/V gradient buffer is
    allocated (K/V checkpoints only), and the gradient is still the documents' sum."""
    docs = [[8, 8, 8, 8]]
    model = tiny_model("LlamaConfig", torch.float64)
    ids, labels, mask, pos = packed_batch(docs, seq=32)
    _, _, ref = per_document_reference(model, ids, labels, docs)
    stats, got = packed_grads(model, ids, labels, None, pos, schedule=ChunkSchedule(chunk_size=8))
    assert rel_error(got, ref) <= 1e-12
    heads, head_dim, layers = 2, 16, 2  # tiny.BASE: 2 KV heads of 64 / 4; two layers
    assert stats.kv_bytes == layers * 2 * (1 * heads * 32 * head_dim) * 8  # K and V, float64, no gradients
    # One boundary inside a chunk: gradients are kept again (the relay inside a document is needed).
    docs = [[12, 20]]
    ids, labels, mask, pos = packed_batch(docs, seq=32)
    _, _, ref = per_document_reference(model, ids, labels, docs)
    stats, got = packed_grads(model, ids, labels, None, pos, schedule=ChunkSchedule(chunk_size=8))
    assert rel_error(got, ref) <= 1e-12 and stats.kv_bytes == 2 * layers * 2 * heads * 32 * head_dim * 8


def test_sliding_window_family_packed():
    model = tiny_model("MistralConfig", torch.float64, sliding_window=6)
    ids, labels, mask, pos = packed_batch()
    _, _, ref = per_document_reference(model, ids, labels)
    _, got = packed_grads(model, ids, labels, mask, pos, schedule=ChunkSchedule(chunk_size=8))
    assert rel_error(got, ref) <= 1e-12


def test_bad_position_ids():
    model = tiny_model("LlamaConfig", torch.float32)
    ids, labels, mask, pos = packed_batch()
    with pytest.raises(ValueError, match="position_ids has shape"):
        chunkwise_backward(model, ids, position_ids=pos[:, :-1], schedule=ChunkSchedule(chunk_size=8))
    with pytest.raises(ValueError, match="position_ids must be a LongTensor"):
        chunkwise_backward(model, ids, position_ids=pos.float(), schedule=ChunkSchedule(chunk_size=8))
