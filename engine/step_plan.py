"""What one chunk-wise step will do, decided before any model runs: a pure function of the batch.

`plan_step` turns the batch into the step's plan: the targets (labels shifted by one on the whole sequence,
cut at document boundaries), the documents of packed rows, the padding to the length the data-parallel ranks
agree on, the chunks and which of them hold loss tokens, the draw, which chunks' K/V a later chunk reads, the
chunks pass 2 recomputes and the order it visits them in. `ranks` is the backend's view of the other ranks
(engine/backend.py: `agree`, `any_rank`, `must_backward`), `sequence` the step's sequence-parallel group
(engine/sequence_parallel.py's SequenceStep: padding so that its ranks divide every chunk, the token count
of rows its ranks share, one draw on all of them); nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.documents import IGNORE, Documents, check_position_ids, documents_of
from engine.options import ChunkOptions
from engine.schedule import ChunkSchedule, Draw, draw_chunks


@dataclass(frozen=True)
class StepPlan:
    input_ids: torch.Tensor  # [batch, seq_len], right-padded to the ranks' agreed length
    targets: torch.Tensor  # token i's target (IGNORE: none), same shape
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor  # given (packed rows) or 0..seq_len-1
    docs: Documents | None  # packed rows' documents (padding included); None: one document per row
    num_tokens: int  # valid targets the loss is divided by (all ranks, or num_items_in_batch)
    chunk_size: int
    chunks: list[tuple[int, int]]  # [start, end) of each chunk (the last one may be shorter)
    has_loss: list[bool]  # chunk c holds a valid target
    draw: Draw
    kv_start: list[int]  # the first key chunk c's queries may read (0 unless packed documents start later)
    read_later: list[bool]  # a later chunk reads chunk c's K/V (else its K/V need no gradient)
    recomputed: frozenset[int]  # the drawn chunks: pass 2 recomputes them and takes their loss there
    order: list[int]  # pass 2's visits, last chunk first: the drawn chunks, or one zero-weight pass

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def weight(self, c: int) -> float:
        """w_c of chunk c in pass 2 (0 for the zero-weight pass of a chunk that was not drawn)."""
        return self.draw.weight_of().get(c, 0.0)

    def relay(self, c: int) -> float:
        """The factor on the K/V gradient relayed into chunk c: its weight, or 0 when nothing reads its K/V."""
        return self.weight(c) if self.read_later[c] else 0.0


def plan_step(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    schedule: ChunkSchedule,
    ranks,
    *,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    num_items_in_batch: int | None = None,
    sequence=None,
) -> StepPlan:
    """The plan of one step; `ranks` agrees on the padded length and token count and ORs per-chunk flags."""
    check_inputs(input_ids, labels, attention_mask, position_ids)
    targets, docs = loss_targets(input_ids, labels, attention_mask, position_ids)
    seq_len, num_tokens = ranks.agree(input_ids.shape[1], int((targets != IGNORE).sum()))
    if sequence is not None:
        seq_len, num_tokens = sequence.padded_length(seq_len), sequence.row_tokens(num_tokens)
    if num_items_in_batch is not None:
        num_tokens = int(num_items_in_batch)
    input_ids, targets, attention_mask, position_ids = pad_to(
        seq_len, input_ids, targets, attention_mask, position_ids, pad_id
    )
    if position_ids is None:
        position_ids = (
            torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)
        )
    docs = None if docs is None else docs.padded(seq_len)
    size = schedule.chunk_size
    chunks = [(s, min(s + size, seq_len)) for s in range(0, seq_len, size)]
    k = len(chunks)
    has_loss = [bool((targets[:, s:e] != IGNORE).any()) for s, e in chunks]
    # The SFT policy's q_c depend on where the loss tokens are: OR-ed over ranks, so all ranks draw alike.
    policy_flags = ranks.any_rank(has_loss) if schedule.loss_chunks == "always" else None
    draw = draw_chunks(schedule, k, generator, policy_flags)
    if sequence is not None:
        sequence.check_draw(draw.selected, k)
    # Packed rows: chunk c reads keys from kv_start[c]; its K/V are read later only if kv_start[c + 1] < its end.
    kv_start = [0 if docs is None else docs.kv_start(s) for s, _ in chunks]
    read_later = [c + 1 < k and kv_start[c + 1] < chunks[c][1] for c in range(k)]
    # DeepSpeed ranks must all backprop at least once per step: an empty draw becomes one zero-weight pass.
    order = sorted(draw.selected, reverse=True) or ([k - 1] if ranks.must_backward else [])
    return StepPlan(
        input_ids, targets, attention_mask, position_ids, docs, num_tokens, size, chunks, has_loss, draw,
        kv_start, read_later, frozenset(draw.selected), order,
    )  # fmt: skip


def loss_targets(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, Documents | None]:
    """Token i's target (IGNORE: none) and the rows' documents (None: one per row): labels shifted by one on
    the whole sequence, no target across a packed document boundary. Gradient accumulation counts a step's
    loss tokens with it before the step's first backward (engine/accumulation.py)."""
    if labels is None:  # like a causal-LM collator: learn every real token, never padding
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE)
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    docs = None if position_ids is None else documents_of(position_ids)
    if docs is not None and docs.doc_ids is None:
        docs = None  # one document per row: plain causal masks
    if docs is not None:
        targets = docs.cut_targets(targets)
    return targets, docs


def check_arguments(schedule, options) -> None:
    """The chunking is a ChunkSchedule and the memory options a ChunkOptions (no loose keywords)."""
    for name, value, cls in (("schedule", schedule, ChunkSchedule), ("options", options, ChunkOptions)):
        if not isinstance(value, cls):
            raise ValueError(
                f"{name}: expected an {cls.__module__}.{cls.__name__}, got {type(value).__name__}"
            )


def check_inputs(input_ids, labels, attention_mask, position_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape [batch, seq]")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: a sequence needs at least 2 tokens, got {input_ids.shape[1]}")
    for name, t in (("labels", labels), ("attention_mask", attention_mask)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(input_ids.shape)}")
    if attention_mask is not None:
        m = attention_mask.to(torch.int)
        if ((m[:, 1:] - m[:, :-1]) > 0).any():  # a 0 followed by a 1: left or inner padding
            raise ValueError("attention_mask: only right padding is supported (a 0 is followed by a 1)")
    if position_ids is not None:
        check_position_ids(position_ids, input_ids)


def pad_to(seq_len, input_ids, targets, attention_mask, position_ids, pad_id):
    """Right-pad this rank's batch to the length all ranks agreed on (padding is masked and never a target;
    in packed rows it continues the last document's positions, so it opens no document of its own)."""
    extra = seq_len - input_ids.shape[1]
    if extra == 0:
        return input_ids, targets, attention_mask, position_ids
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is not None:
        tail = position_ids[:, -1:] + torch.arange(1, extra + 1, device=position_ids.device)
        position_ids = torch.cat([position_ids, tail], dim=1)
    return (
        F.pad(input_ids, (0, extra), value=pad_id),
        F.pad(targets, (0, extra), value=IGNORE),
        F.pad(attention_mask, (0, extra), value=0),
        position_ids,
    )
