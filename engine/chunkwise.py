"""Chunk-wise backprop: SeCO (exact) and SpaCO (sparse, unbiased). The paper's Algorithms 1 and 2 live here.

    targets  = labels shifted by one on the *whole* sequence, so a chunk's last token targets the next chunk's
               first token; loss = sum of CE over valid targets / number of valid targets (HF's definition)
    pass 1   (no grad)  for c = 0 .. k-1: run chunk c against the cached prefix; its K/V become checkpoints
    draw     SeCO: every chunk; SpaCO: each chunk with probability q (or t of k), weight w = 1/q (or k/t)
    pass 2   for c in the drawn chunks, last to first: re-run chunk c with grad against the cached prefix and
             backprop  w * (loss_c + <KV_c, G_c>),  where G_c is what later chunks deposited on chunk c's KV
             (engine/kv_cache.py does the deposit and the relay inside autograd); free the chunk's graph.

Only one chunk's graph is alive at a time; the K/V checkpoints and their gradients (bfloat16 for bf16 models
by default, see ChunkOptions.kv_grad_dtype) are the only state that grows with the sequence (docs/design.md
section 4). The step's plan is engine/step_plan.py's, one chunk's forward engine/chunk_runner.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.backend import backend_for
from engine.chunk_runner import ChunkRunner, check_model, pad_id
from engine.layer_checkpoint import checkpointed_layers, hf_checkpointing_taken_over
from engine.options import ChunkOptions
from engine.schedule import MODES, SAMPLERS, ChunkSchedule, draw_chunks
from engine.sequence_parallel import SequenceStep
from engine.step_plan import StepPlan, check_arguments, plan_step
from engine.step_state import Fp32GradAccumulation
from engine.unwrap import text_config

__all__ = [
    "MODES", "SAMPLERS", "ChunkOptions", "ChunkSchedule", "ChunkStats", "chunkwise_backward", "draw_chunks",
]  # fmt: skip


DEFAULT_OPTIONS = ChunkOptions()  # frozen: one shared default is safe


@dataclass
class ChunkStats:
    loss: float  # the full-sequence loss: exact also under SpaCO (unvisited chunks' loss comes from pass 1)
    num_tokens: int  # valid target tokens the loss is averaged over
    num_chunks: int
    selected: list[int]  # chunks back-propagated in pass 2
    compensation: float  # largest weight w_c among back-propagated chunks (1.0 for SeCO; 0.0 if none)
    seq_len: int
    chunk_size: int
    kv_bytes: int = 0  # K/V checkpoints + K/V gradients held during the step
    state_bytes: int = 0  # the part of kv_bytes that is recurrent layers' boundary states (+ their gradients)
    # MoE with output_router_logits: HF's aux_loss (without its coefficient); `loss` then includes
    # coef * aux_loss, as HF's `.loss` does (engine/moe.py). None: the model's loss has no router term.
    aux_loss: float | None = None
    weights: list[float] = field(default_factory=list)  # w_c of each chunk in `selected`


def chunkwise_backward(
    model,
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    schedule: ChunkSchedule,
    options: ChunkOptions = DEFAULT_OPTIONS,
    generator: torch.Generator | None = None,
    num_items_in_batch: int | None = None,
    sequence_group=None,
    last_micro_batch: bool = True,
) -> ChunkStats:
    """Add to every trainable parameter's .grad the gradient (SeCO) or an unbiased estimate of it (SpaCO) of
    `model(input_ids, labels=labels, attention_mask=attention_mask).loss`, one chunk's graph at a time.

    `schedule` is the chunking (engine/schedule.py), `options` where the step keeps its memory
    (engine/options.py). `model` may also be a `deepspeed.DeepSpeedEngine`: chunks then run and backprop
    through the engine, and the caller calls `engine.step()` (engine/backend.py). `num_items_in_batch`
    overrides the (global) token count the loss is divided by, as HF's argument of that name. `position_ids`
    in HF's packed convention (restarting at 0 per document) make documents packed into one row independent
    (engine/documents.py). `generator` draws SpaCO's chunks (the same state on every rank). `sequence_group`
    (engine/sequence_parallel.py's SequenceGroup) splits every chunk over the ranks that share these rows; a
    DeepSpeed engine initialised with the sequence-parallel mpu brings its own. A model with transformers'
    gradient checkpointing enabled gets `checkpoint_layers` for the step instead (transformers' own drops the
    cache), its flags restored after. Gradient accumulation (engine/accumulation.py): the caller holds the
    backend's step context open over an optimizer step's micro-batches, passes their global token count as
    `num_items_in_batch` and `last_micro_batch=False` to all but the last, so that only the last backward of
    the step is an accumulation boundary (one gradient reduction per optimizer step).
    """
    check_arguments(schedule, options)
    backend = backend_for(model)
    cfg = text_config(backend.module.config)
    check_model(backend.module)
    sp = SequenceStep.of(backend, sequence_group, cfg, schedule.chunk_size)
    plan = plan_step(
        input_ids, labels, attention_mask, position_ids, schedule, backend, pad_id=pad_id(backend.module),
        generator=generator, num_items_in_batch=num_items_in_batch, sequence=sp,
    )  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    needs_kv_grad = bool(plan.order) and bool(trainable) and any(plan.read_later)
    runner = ChunkRunner(model, backend.module, plan, options, needs_kv_grad, sp)

    # Pass 1: every chunk, no graph. The K/V checkpoints fill up; the loss is exact for logging.
    loss_sum = torch.zeros((), dtype=torch.float64, device=plan.input_ids.device)
    with torch.no_grad(), runner.attention():
        for c in range(plan.num_chunks):
            ce = runner.run(c, grad=False, last=c == plan.num_chunks - 1)
            if c not in plan.recomputed and ce is not None:
                loss_sum += ce

    # Pass 2: drawn chunks in reverse; each backward deposits on earlier chunks' K/V gradients. DeepSpeed
    # averages gradients over ranks, hence the world size against the global token count.
    scale = runner.loss_scale(backend.world_size)
    with (
        runner.sequence_grads(trainable),
        Fp32GradAccumulation(trainable, enabled=not backend.accumulates_fp32),
        backend.step_context(),
        runner.attention(),
        # transformers' own checkpointing would drop the cache in every layer: ours replaces it, cache kept
        hf_checkpointing_taken_over(backend.module) as hf_checkpointing,
        checkpointed_layers(
            backend.module, options.checkpoint_layers or runner.can_take_over(hf_checkpointing)
        ),
    ):
        for i, c in enumerate(plan.order):
            last = i == len(plan.order) - 1
            ce = runner.run(c, grad=True, last=last)
            if c in plan.recomputed and plan.has_loss[c]:
                loss_sum += ce.detach()
            backend.backward(plan.weight(c) * runner.objective(ce * scale), is_last=last and last_micro_batch)
    return _stats(plan, runner, backend, backend.total(float(runner.group_loss(loss_sum))))


def _stats(plan: StepPlan, runner: ChunkRunner, backend, loss_sum: float) -> ChunkStats:
    aux, n = runner.aux_loss(backend), plan.num_tokens
    return ChunkStats(
        loss=(loss_sum / n if n else float("nan")) + (runner.router.coef * aux if aux is not None else 0.0),
        num_tokens=n,
        num_chunks=plan.num_chunks,
        selected=plan.draw.selected,
        compensation=max(plan.draw.weights, default=0.0),
        seq_len=plan.seq_len,
        chunk_size=plan.chunk_size,
        kv_bytes=runner.cache.kv_bytes(),
        state_bytes=runner.cache.state_bytes(),
        aux_loss=aux,
        weights=plan.draw.weights,
    )
