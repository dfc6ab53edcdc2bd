"""Gradient accumulation (engine/accumulation.py), one process, float64: N micro-batches of uneven lengths,
with padding and -100 spans, give the gradient of HF's loss on one batch holding all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, packed_positions, reference_grads, rel_error, tiny_model

from engine.accumulation import attention_pairs, count_step_tokens, step_context
from engine.chunkwise import chunkwise_backward
from engine.schedule import ChunkSchedule, spaco_generator
from engine.step_plan import loss_targets


def micro_batches() -> list[dict[str, torch.Tensor]]:
    """Three micro-batches: rows of 37, 23 and 29 tokens, right padding in two, -100 spans in two."""
    g = torch.Generator().manual_seed(3)
    out = []
    for rows, seq, real, ignore in (
        (2, 37, [37, 30], (5, 9)),
        (1, 23, [23], None),
        (2, 29, [11, 29], (20, 26)),
    ):
        ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
        mask = torch.zeros(rows, seq, dtype=torch.long)
        for r, n in enumerate(real):
            mask[r, :n] = 1
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        if ignore:
            labels[-1, ignore[0] : ignore[1]] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def one_batch(micro: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """All micro-batches' rows in one batch, right-padded to the longest (padding: id 0, label -100, mask 0)."""
    seq = max(b["input_ids"].shape[1] for b in micro)
    fill = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    return {
        k: torch.cat([F.pad(b[k], (0, seq - b[k].shape[1]), value=v) for b in micro]) for k, v in fill.items()
    }


def accumulate(model, micro, schedule, seed: int = 7, normalise: bool = True) -> float:
    """The trainer's step: count the step's loss tokens first, then every micro-batch's chunk-wise backward
    divided by that count, inside one step context."""
    tokens = count_step_tokens(model, micro)
    loss = 0.0
    with step_context(model):
        for i, b in enumerate(micro):
            stats = chunkwise_backward(
                model,
                b["input_ids"],
                labels=b["labels"],
                attention_mask=b["attention_mask"],
                schedule=schedule,
                generator=spaco_generator(seed, 1, i),
                num_items_in_batch=tokens.loss_tokens if normalise else None,
                last_micro_batch=i == len(micro) - 1,
            )
            loss += stats.loss
    return loss


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


SCHEDULES = {
    "seco": ChunkSchedule(chunk_size=8),
    "spaco-q1": ChunkSchedule(chunk_size=8, mode="spaco", sample_prob=1.0),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_micro_batches_give_the_gradient_of_hfs_loss_on_the_whole_batch(name):
    model = tiny_model()  # float64
    micro = micro_batches()
    whole = one_batch(micro)
    ref_loss, ref = reference_grads(model, whole["input_ids"], whole["labels"], whole["attention_mask"])
    # HF's own .loss of the whole batch (it upcasts float64 logits to float32): the same number
    hf_loss = model(**whole).loss.item()
    assert hf_loss == pytest.approx(ref_loss, rel=1e-6)

    loss = accumulate(model, micro, SCHEDULES[name])
    assert rel_error(grads(model), ref) < 1e-10
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    # Negative control: each micro-batch normalised by its own token count (a mean of means) is another
    # gradient, and the count over all micro-batches is what makes the difference.
    accumulate(model, micro, SCHEDULES[name], normalise=False)
    assert rel_error(grads(model), ref) > 1e-2


def test_the_step_token_count_is_what_chunkwise_backward_trains_on():
    """Shifted labels, no target in padding, none across a packed document boundary: count_step_tokens and
    chunk-wise backprop's own count agree (packed rows included)."""
    model = tiny_model()
    packed = {k: v for k, v in micro_batches()[0].items()}
    packed["position_ids"] = packed_positions([[10, 15, 12], [20, 10]], 37)
    for b in [*micro_batches(), packed]:
        stats = chunkwise_backward(model, **b, schedule=ChunkSchedule(chunk_size=8))
        assert count_step_tokens(model, [b]).loss_tokens == stats.num_tokens
    model.zero_grad(set_to_none=True)
    b = micro_batches()[0]
    # row 0 of 37 real tokens, a 4-token -100 span; row 1 of 30 real tokens: 36 - 4 + 29 targets
    t, _ = loss_targets(b["input_ids"], b["labels"], b["attention_mask"], None)
    assert int((t != -100).sum()) == 61
    # packed: no target across the 2 document boundaries of row 0 and the 1 of row 1
    t, _ = loss_targets(
        packed["input_ids"], packed["labels"], packed["attention_mask"], packed["position_ids"]
    )
    assert int((t != -100).sum()) == 61 - 2 - 1


def test_attention_pairs_count_documents_not_rows():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert attention_pairs(mask, None, mask.shape) == 16 + 25
    pos = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert attention_pairs(mask, pos, mask.shape) == 4 + 4 + 25  # row 0: documents of 2 and 2 real tokens


def test_a_micro_batch_frees_its_kv_before_the_next():
    """Each call's K/V checkpoints and gradients are gone when it returns, without waiting for Python's cyclic
    collector (cache layers hold their cache weakly): an accumulated step's heap peak is one micro-batch's."""
    import gc

    from engine.memory import MemoryTracker

    model = tiny_model(dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(3, VOCAB, (3, 64), generator=torch.Generator().manual_seed(0))
    peaks = []
    gc.collect()
    gc.disable()
    try:
        for n in (1, 3):
            with MemoryTracker("cpu") as mt:
                for i in range(n):
                    chunkwise_backward(model, ids[i : i + 1], schedule=ChunkSchedule(chunk_size=8))
            peaks.append(mt.peak_bytes)
    finally:
        gc.enable()
    assert peaks[1] <= peaks[0] * 1.05, peaks


def test_each_micro_batch_of_a_step_draws_its_own_chunks():
    """SpaCO: the same row as micro-batch 0 and 1 of one step is drawn independently (different selections on
    some steps), and every draw repeats for the same (seed, step, micro-batch)."""
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5))
    schedule = ChunkSchedule(chunk_size=8, mode="spaco", sample_prob=0.5)

    def selected(step: int, micro: int) -> list[int]:
        stats = chunkwise_backward(model, ids, schedule=schedule, generator=spaco_generator(42, step, micro))
        model.zero_grad(set_to_none=True)
        return stats.selected

    draws = [(selected(step, 0), selected(step, 1)) for step in range(1, 6)]
    assert any(a != b for a, b in draws)  # micro-batches of one step do not share a draw
    assert selected(3, 1) == draws[2][1]
    assert selected(1, 0) != selected(2, 0) or selected(3, 0) != selected(4, 0)  # steps draw afresh
