"""Gradient accumulation: one optimizer step over N micro-batches per data-parallel rank.

The accumulated gradient is exactly the gradient of the loss HF computes on the whole effective batch (N
micro-batches x all ranks): the mean cross-entropy over every loss token of the step. As HF's Trainer does
(`num_items_in_batch`), the step's micro-batches are fetched first and their loss tokens counted over all
ranks before the first backward; every micro-batch's loss is then its summed cross-entropy divided by that
one count, and the micro-batches' gradients add up to the step's.

The backend's step context (DeepSpeed's coalesced ZeRO 1-3 reduction) spans all micro-batches, and only the
last backward of the last micro-batch is an accumulation boundary: the gradients are reduced over ranks once
per optimizer step, not once per micro-batch (or chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.backend import backend_for
from engine.documents import IGNORE, documents_of
from engine.step_plan import loss_targets


def attention_pairs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, shape) -> int:
    """Sum over the rows' documents of (real tokens)^2: what causal attention's work grows with."""
    real = torch.ones(shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    docs = None if position_ids is None else documents_of(position_ids.cpu())
    if docs is None or docs.doc_ids is None:  # one document per row
        return int((real.sum(dim=1).long() ** 2).sum())
    total = 0
    for row, ids in zip(real, docs.doc_ids, strict=True):
        total += int((torch.bincount(ids[row]).long() ** 2).sum())
    return total


@dataclass(frozen=True)
class StepTokens:
    """Token counts of one optimizer step, summed over its micro-batches and all data-parallel ranks."""

    loss_tokens: int  # valid targets: every micro-batch's loss is divided by this (HF's num_items_in_batch)
    real_tokens: int  # non-padding input tokens (what tokens_per_s counts)
    attention_pairs: int  # sum of squared document lengths (the attention term of the step's FLOPs)


def count_step_tokens(model, micro_batches: list[dict[str, torch.Tensor]], copies: int = 1) -> StepTokens:
    """Count the step's tokens on this rank and sum them over the ranks of `model` (a module or a DeepSpeed
    engine), where `copies` ranks hold each row (the ranks of a sequence-parallel group); every rank must call
    it (a collective)."""
    loss = real = pairs = 0
    for b in micro_batches:
        ids, mask, pos = b["input_ids"], b.get("attention_mask"), b.get("position_ids")
        targets, _ = loss_targets(
            ids, b.get("labels"), mask, pos
        )  # the targets chunk-wise backprop trains on
        loss += int((targets != IGNORE).sum())
        real += ids.numel() if mask is None else int(mask.sum())
        pairs += attention_pairs(mask, pos, tuple(ids.shape))
    backend = backend_for(model)
    # float64 all-reduces: exact for counts below 2^53
    return StepTokens(*(int(backend.total(float(x))) // copies for x in (loss, real, pairs)))


def step_context(model):
    """What makes the gradient reduction happen once for all micro-batches of an optimizer step: enter it
    around the step's chunkwise_backward calls (the last one with last_micro_batch=True)."""
    return backend_for(model).step_context()
