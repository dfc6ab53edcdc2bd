"""The step plan (engine/step_plan.py) without a model: the zero-weight pass, documents across padding,
which chunks' K/V are read later, and the SpaCO policy's flags over ranks."""

from __future__ import annotations

import pytest
import torch

from engine.backend import LocalBackend
from engine.documents import IGNORE, documents_of
from engine.schedule import ChunkSchedule
from engine.step_plan import plan_step


class Ranks:
    """Stands in for the other data-parallel ranks: a longer sequence, more tokens, their loss flags."""

    world_size = 2

    def __init__(self, must_backward=True, longest=0, tokens=0, flags=None):
        self.must_backward, self.longest, self.tokens, self.flags = must_backward, longest, tokens, flags

    def agree(self, seq_len, num_tokens):
        return max(seq_len, self.longest), num_tokens + self.tokens

    def any_rank(self, flags):
        return [a or b for a, b in zip(flags, self.flags or [False] * len(flags))]


def ids_of(batch, seq):
    return torch.arange(3, 3 + batch * seq).reshape(batch, seq)


def test_empty_draw_under_a_must_backward_backend_is_one_zero_weight_pass():
    ids = ids_of(1, 16)
    empty = ChunkSchedule(chunk_size=4, mode="spaco", sample_prob=0.5, selected=())
    p = plan_step(ids, None, None, None, empty, Ranks(must_backward=True))
    assert p.draw.selected == [] and p.recomputed == frozenset()
    assert p.order == [3] and p.weight(3) == 0.0 and p.relay(3) == 0.0  # the last chunk, weight 0
    # A plain module has nothing to synchronise: an empty draw backprops nothing.
    assert plan_step(ids, None, None, None, empty, LocalBackend(None)).order == []
    # Drawn chunks: recomputed and visited last to first, with their weights.
    drawn = ChunkSchedule(chunk_size=4, mode="spaco", sample_prob=0.5, selected=(0, 2))
    p = plan_step(ids, None, None, None, drawn, Ranks())
    assert p.order == [2, 0] and p.recomputed == {0, 2} and p.weight(2) == 2.0 and p.weight(1) == 0.0
    seco = plan_step(ids, None, None, None, ChunkSchedule(chunk_size=4), Ranks())
    assert seco.order == [3, 2, 1, 0] and seco.recomputed == {0, 1, 2, 3}


def test_targets_shift_over_the_whole_sequence_and_padding_is_never_a_target():
    ids = ids_of(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    p = plan_step(ids, None, mask, None, ChunkSchedule(chunk_size=4), Ranks(longest=13, tokens=5))
    assert p.seq_len == 13 and p.chunks == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert torch.equal(p.targets[0, :9], ids[0, 1:]) and (p.targets[0, 9:] == IGNORE).all()
    assert torch.equal(p.targets[1, :6], ids[1, 1:7]) and (p.targets[1, 6:] == IGNORE).all()
    assert p.num_tokens == 9 + 6 + 5  # this rank's valid targets plus the other rank's
    assert (p.attention_mask[:, 10:] == 0).all() and p.has_loss == [True, True, True, False]
    assert torch.equal(p.position_ids[0], torch.arange(13))
    p = plan_step(ids, None, mask, None, ChunkSchedule(chunk_size=4), Ranks(), num_items_in_batch=40)
    assert p.num_tokens == 40


def test_documents_across_padding_equal_those_of_the_padded_positions():
    """Padding continues each row's last document: the documents computed before padding and padded equal
    those of the padded position_ids, and no target crosses a document boundary."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    ids = ids_of(2, 10)
    p = plan_step(ids, None, None, pos, ChunkSchedule(chunk_size=4), Ranks(longest=16))
    assert p.seq_len == 16
    assert torch.equal(p.position_ids[:, 10:], pos[:, -1:] + torch.arange(1, 7))
    padded = documents_of(p.position_ids)
    assert torch.equal(p.docs.doc_ids, padded.doc_ids) and torch.equal(p.docs.starts, padded.starts)
    assert p.targets[0, 2] == IGNORE and p.targets[0, 6] == IGNORE  # last tokens of documents 1 and 2
    assert p.targets[0, 1] == ids[0, 2] and p.targets[1, 4] == IGNORE and p.targets[1, 3] == ids[1, 4]
    assert (p.targets[:, 9:] == IGNORE).all() and (p.attention_mask[:, 10:] == 0).all()
    assert p.num_tokens == 2 * 9 - 2 - 1  # 9 shifted targets per row, less the boundaries' 2 + 1
    # One document per row: plain causal masks, no document layout.
    assert (
        plan_step(ids, None, None, torch.arange(10).expand(2, -1), ChunkSchedule(chunk_size=4), Ranks()).docs
        is None
    )


def test_kv_read_later_only_across_a_chunk_boundary_inside_a_document():
    """Documents of 4 + 8 tokens, chunks of 4: chunk 1 starts a document, so nothing after chunk 0 reads its
    K/V (no relay into it); chunk 1's K/V are read by chunk 2 (same document). A boundary inside chunk 0 in
    one row (negative control): chunk 1 then reads chunk 0 there."""
    on_boundary = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]] * 2)
    p = plan_step(ids_of(2, 12), None, None, on_boundary, ChunkSchedule(chunk_size=4), Ranks())
    assert p.kv_start == [0, 4, 4] and p.read_later == [False, True, False]
    assert p.relay(0) == 0.0 and p.relay(1) == 1.0 and p.relay(2) == 0.0
    inside = on_boundary.clone()
    inside[1] = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    p = plan_step(ids_of(2, 12), None, None, inside, ChunkSchedule(chunk_size=4), Ranks())
    assert p.kv_start == [0, 3, 3] and p.read_later == [True, True, False]
    unpacked = plan_step(ids_of(2, 12), None, None, None, ChunkSchedule(chunk_size=4), Ranks())
    assert unpacked.kv_start == [0, 0, 0] and unpacked.read_later == [True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_spaco_policy_always_draws_chunks_with_loss_on_any_rank(seed):
    """loss_chunks 'always': q_c = 1 where any rank has a loss token (OR-ed over ranks, so every rank draws
    the same chunks); the others are sampled with sample_prob and weighted 1/q."""
    ids = ids_of(1, 16)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 10:12] = ids[0, 10:12]  # targets at positions 9, 10: chunk 2 of 4
    sched = ChunkSchedule(chunk_size=4, mode="spaco", sample_prob=0.25, loss_chunks="always")
    gen = torch.Generator().manual_seed(seed)
    p = plan_step(ids, labels, None, None, sched, Ranks(flags=[True, False, False, False]), generator=gen)
    assert p.has_loss == [False, False, True, False]  # this rank's own flags
    assert p.draw.probs == [1.0, 0.25, 1.0, 0.25]  # chunk 0 holds another rank's loss tokens
    assert {0, 2} <= p.recomputed and p.weight(0) == p.weight(2) == 1.0
    assert all(p.weight(c) == 4.0 for c in p.recomputed - {0, 2})
    sampled = ChunkSchedule(chunk_size=4, mode="spaco", sample_prob=0.25)  # policy off: flags unused
    assert (
        plan_step(ids, labels, None, None, sampled, Ranks(flags=None), generator=gen).draw.probs == [0.25] * 4
    )
