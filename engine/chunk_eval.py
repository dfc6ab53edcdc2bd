"""Chunk-wise scoring without a graph: pass 1 of chunk-wise backprop on its own, for evaluation.

The batch is planned as a training step is (engine/step_plan.py: targets, packed documents, chunks) and run
by the training step's chunk runner (engine/chunk_runner.py), pass 1 only: every chunk against the K/V cache
of the chunks before it, under `torch.no_grad`, nothing recomputed, no K/V gradients. Scoring a sequence
therefore costs what pass 1 of a training step costs (K/V of the prefix plus one chunk's activations): every
length that trains also evaluates, where a plain forward holds every layer's activations and the whole
sequence's logits at once.

The targets are the training loss's, so `loss_sum / num_tokens` is HF's `.loss` of the same rows. Two ways:

    loss    the summed cross-entropy, as pass 1 computes it (with `options.fused_loss` a slice of tokens'
            logits at a time, engine/loss.py)
    argmax  also whether each target is the argmax of its logits (teacher-forced exact match): the model
            computes logits only at the target positions (`logits_to_keep` with their indices)

MoE models score the language-model loss alone: the router's load-balancing term is not part of it.

Under sequence parallelism (`sequence_group`, engine/sequence_parallel.py) the P ranks of the group score the
same rows, each chunk split over them as in training (K/V head-sharded: the memory of a training step's pass
1 under the same P); each rank computes its tokens' share and the group's sums are returned on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from engine.backend import LocalBackend, backend_for
from engine.chunk_runner import ChunkRunner, accepts_logits_to_keep, ce_sum, check_model, pad_id
from engine.concerns import Chunk, ChunkConcern, ChunkOutput
from engine.documents import IGNORE
from engine.options import ChunkOptions
from engine.schedule import ChunkSchedule
from engine.sequence_parallel import SequenceStep
from engine.step_plan import StepPlan, plan_step
from engine.unwrap import text_config

DEFAULT_OPTIONS = ChunkOptions()


@dataclass
class Scores:
    loss_sum: float  # summed cross-entropy over the valid targets, in float64
    num_tokens: int  # valid targets
    row_tokens: torch.Tensor  # [batch] valid targets per row
    row_correct: torch.Tensor | None  # [batch] targets predicted by the argmax (argmax=True only)


@torch.no_grad()
def score(
    model,
    input_ids: torch.Tensor,
    *,
    chunk_size: int,
    options: ChunkOptions = DEFAULT_OPTIONS,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    argmax: bool = False,
    sequence_group=None,
) -> Scores:
    """Score a batch chunk by chunk; `model` is an HF (or PEFT) causal LM or a DeepSpeed engine. The
    caller puts the model in eval mode (no dropout) and, under ZeRO-3, runs the same number of calls with
    the same sequence length on every rank (each chunk's forward gathers parameters): this rank's batch
    is scored as it is, without agreeing on anything with the other ranks but those of `sequence_group`
    (engine/sequence_parallel.py's SequenceGroup), which hold the same rows and score them together."""
    module = backend_for(model).module
    check_model(module)
    local = LocalBackend(module)
    # A plain step over the group (nothing else reduces across it): the group's sums are taken below.
    sp = SequenceStep.of(local, sequence_group, text_config(module.config), chunk_size)
    plan = plan_step(
        input_ids, labels, attention_mask, position_ids, ChunkSchedule(chunk_size=chunk_size), local,
        pad_id=pad_id(module), sequence=sp,
    )  # fmt: skip
    # Pass 1 alone: no chunk is left for a pass 2, so every chunk's loss is taken in pass 1.
    plan = dataclasses.replace(plan, recomputed=frozenset(), order=[])
    hits = _ArgmaxHits(module, plan) if argmax else None
    if argmax:  # the fused loss hands the LM head no input: the kept logits need the model's own head
        options = dataclasses.replace(options, fused_loss=False)
    # hits last: its logits_to_keep is the one the forward gets
    extra = [] if hits is None else [hits]
    runner = ChunkRunner(model, module, plan, options, needs_kv_grad=False, sp=sp, extra=extra)
    loss_sum = torch.zeros((), dtype=torch.float64, device=plan.input_ids.device)
    with runner.attention():
        for c in range(plan.num_chunks):
            ce = runner.run(c, grad=False, last=c == plan.num_chunks - 1)
            if ce is not None:
                loss_sum += ce.double()
    row_tokens = (plan.targets != IGNORE).sum(dim=1)
    correct = None if hits is None else hits.correct
    if sp is not None:  # each rank scored its tokens of every chunk; the rows' targets are the group's
        loss_sum = sp.group.all_sum(loss_sum)
        correct = None if correct is None else sp.group.all_sum(correct)
    return Scores(float(loss_sum), int(row_tokens.sum()), row_tokens, correct)


class _ArgmaxHits(ChunkConcern):
    """Asks the model for the logits of a chunk's target positions only, takes the chunk's loss from them
    and counts, per row, the targets that are their logits' argmax."""

    def __init__(self, module, plan: StepPlan):
        self.module, self.plan = module, plan
        self.correct = torch.zeros(plan.input_ids.shape[0], dtype=torch.long, device=plan.input_ids.device)
        self.by_index = accepts_logits_to_keep(module)

    def _kept(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        targets = self.plan.targets[:, chunk.start : chunk.end]
        keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
        return keep, targets[:, keep]

    def forward_kwargs(self, chunk: Chunk) -> dict:
        return {"logits_to_keep": self._kept(chunk)[0]} if chunk.with_loss and self.by_index else {}

    @contextlib.contextmanager
    def around(self, chunk: Chunk, out: ChunkOutput):
        if not chunk.with_loss:
            yield
            return
        captured = []
        handle = self.module.register_forward_hook(lambda m, args, output: captured.append(output.logits))
        try:
            yield
        finally:
            handle.remove()
        keep, targets = self._kept(chunk)
        logits = captured[-1] if self.by_index else captured[-1][:, keep]
        out.loss = ce_sum(logits, targets)
        self.correct += ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum(dim=1)
