"""`ChunkwiseTrainer`: transformers' `Trainer` whose training step is chunk-wise backprop (SeCO or SpaCO).

Everything else stays the Trainer's: data loading and collation, the optimizer and LR schedule, logging,
checkpointing (`save_steps`, `resume_from_checkpoint`), and its DeepSpeed integration (`--deepspeed
ds_config.json`). Only `training_step` changes: instead of one forward over the whole sequence and one
backward, `chunkwise_backward` runs the batch chunk by chunk and leaves the same gradient (SeCO) or an
unbiased estimate of it (SpaCO) in the parameters' `.grad`, or in DeepSpeed's buffers.

    trainer = ChunkwiseTrainer(
        model=model, args=TrainingArguments(...), train_dataset=ds, data_collator=collate,
        schedule=ChunkSchedule(chunk_size=1024, mode="spaco", sample_prob=0.5, loss_chunks="always"),
    )
    trainer.train()

Batches are dicts with `input_ids` and optionally `labels`, `attention_mask` (right padding) and
`position_ids` (packed rows, HF's convention: positions restart at 0 per document).

Gradient accumulation (`gradient_accumulation_steps`) with the Trainer's own normalisation: every
micro-batch's loss is divided by the `num_items_in_batch` the Trainer counted over the step's micro-batches
(and ranks), or, where the Trainer counts none, by the micro-batch's own token count times the number of
micro-batches. Under DeepSpeed the coalesced gradient reduction spans the step's micro-batches and the
engine steps once, after the last. Multi-process training goes through DeepSpeed (DDP-wrapped models are
refused: DDP reduces gradients after every backward, i.e. once per chunk).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from engine.accumulation import count_step_tokens, step_context
from engine.chunk_eval import score
from engine.chunkwise import DEFAULT_OPTIONS, ChunkOptions, ChunkStats, chunkwise_backward
from engine.evaluate import eval_mode
from engine.schedule import ChunkSchedule, spaco_generator
from engine.zero3_leaves import mark_moe_blocks_as_leaves


class ChunkwiseTrainer(Trainer):
    """A `transformers.Trainer` training with chunk-wise backprop; `schedule` says how (engine/schedule.py).

    `options` where the step keeps its memory (engine/options.py; the defaults of a run config's chunking
    section). `seed` seeds SpaCO's draw per step as launch/train.py's optim.seed does (same on every rank,
    so ranks draw the same chunks). `last_stats` holds the last step's ChunkStats.
    """

    def __init__(
        self,
        *args,
        schedule: ChunkSchedule,
        options: ChunkOptions = DEFAULT_OPTIONS,
        seed: int = 0,
        **kwargs,
    ):
        if not isinstance(schedule, ChunkSchedule):
            raise ValueError(
                f"schedule: expected an engine.schedule.ChunkSchedule, got {type(schedule).__name__}"
            )
        if not isinstance(options, ChunkOptions):
            raise ValueError(
                f"options: expected an engine.options.ChunkOptions, got {type(options).__name__}"
            )
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        refuse_sequence_sharding(getattr(training_args, "parallelism_config", None))  # before any group
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and is_deepspeed_zero3_enabled():  # before accelerate hands it to DeepSpeed
            mark_moe_blocks_as_leaves(model)
        super().__init__(*args, **kwargs)
        # accelerate may build its parallelism config from the environment (ACCELERATE_USE_PARALLELISM_CONFIG)
        refuse_sequence_sharding(getattr(self.accelerator, "parallelism_config", None))
        self.schedule, self.options, self.seed = schedule, options, seed
        self.last_stats: ChunkStats | None = None
        self._step = contextlib.ExitStack()  # the open optimizer step's gradient-reduction context
        self._micro = 0  # micro-batches of the open optimizer step done so far

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(
                "ChunkwiseTrainer: DDP reduces gradients after every chunk's backward; run multi-process "
                "training through DeepSpeed (--deepspeed ds_config.json)"
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        # The project trainer's draw of the same micro-batch (its steps count from 1, the Trainer's from 0).
        generator = spaco_generator(self.seed, self.state.global_step + 1, self._micro)
        last = self.accelerator.sync_gradients  # the Trainer's flag: this micro-batch ends the step
        if self._micro == 0:  # one gradient reduction for all of the step's micro-batches
            self._step.enter_context(step_context(model))
        with self.compute_loss_context_manager():
            stats = chunkwise_backward(
                model,
                **_batch(inputs),
                schedule=self.schedule,
                options=self.options,
                generator=generator,
                num_items_in_batch=self._loss_tokens(model, inputs, num_items_in_batch),
                last_micro_batch=last,
            )
        self._micro += 1
        if last:
            self._step.close()
            self._micro = 0
            if self.is_deepspeed_enabled:
                # accelerate steps the DeepSpeed engine inside accelerator.backward, which chunk-wise backprop
                # replaces (one engine.backward per chunk); the Trainer's optimizer.step is then a no-op. The
                # boundary is set here: the coalesced reduction's context restores the flag it found on entry,
                # and the engine's own counter (its gradient_accumulation_steps, the Trainer's) would not step.
                model.set_gradient_accumulation_boundary(True)
                model.step()
        self.last_stats = stats
        return torch.tensor(stats.loss, device=self.args.device)

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation's loss chunk-wise without a graph (engine/chunk_eval.py): the batch's HF `.loss`, in
        the memory of pass 1 of a training step, so every length that trains also evaluates. Logits for
        `compute_metrics` (prediction_loss_only false) are the whole sequence's anyway: the Trainer's own
        forward returns them."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with eval_mode(model):
            s = score(model, **_batch(inputs), chunk_size=self.schedule.chunk_size, options=self.options)
        loss = s.loss_sum / s.num_tokens if s.num_tokens else float("nan")
        return torch.tensor(loss, device=self.args.device), None, None

    def _loss_tokens(self, model, inputs: dict[str, Any], num_items_in_batch: Any) -> int:
        """What this micro-batch's summed cross-entropy is divided by, as the Trainer divides its loss: its
        num_items_in_batch (shifted labels over the step's micro-batches; summed over ranks, or this rank's
        count when average_tokens_across_devices is off, then DeepSpeed's average over ranks divides once
        more), else the micro-batch's own count times the micro-batches of the step."""
        world = self.args.world_size
        if num_items_in_batch is not None:
            per_rank = world > 1 and not self.args.average_tokens_across_devices
            return int(num_items_in_batch) * (world if per_rank else 1)
        return count_step_tokens(model, [inputs]).loss_tokens * self.current_gradient_accumulation_steps


def refuse_sequence_sharding(parallelism_config) -> None:
    """TrainingArguments' sequence parallelism (`parallelism_config` sp_size: DeepSpeed's ALST/Ulysses) and
    context parallelism (cp_size) hand each rank a slice of every sequence, where chunk-wise backprop needs the
    whole rows on every rank: refused by name rather than trained on slices as if they were sequences."""
    if parallelism_config is None:
        return
    for name in ("sp_size", "cp_size"):
        size = getattr(parallelism_config, name, None) or 1
        if size > 1:
            raise ValueError(
                f"ChunkwiseTrainer: parallelism_config.{name}={size} splits every sequence over ranks, which "
                "chunk-wise backprop does not take (it needs each rank's rows whole); train with "
                "parallelism_config unset, or use launch/train.py's parallel.sequence (sequence parallelism "
                "inside each chunk)"
            )


def _batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a collated batch that a chunk-wise step takes (`input_ids` required)."""
    names = ("labels", "attention_mask", "position_ids")
    return {"input_ids": inputs["input_ids"], **{n: inputs.get(n) for n in names}}
