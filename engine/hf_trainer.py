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

Gradient accumulation: the chunks of a batch already replace it, and chunk-wise backprop normalises by the
batch's exact target count across ranks; `gradient_accumulation_steps` must therefore be 1 (raise the batch
size instead, its memory cost is one chunk's). Multi-process training goes through DeepSpeed (DDP-wrapped
models are refused: DDP reduces gradients after every backward, i.e. once per chunk).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from engine.chunk_eval import score
from engine.chunkwise import DEFAULT_OPTIONS, ChunkOptions, ChunkStats, chunkwise_backward
from engine.evaluate import eval_mode
from engine.schedule import ChunkSchedule, spaco_generator


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
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps: must be 1 with ChunkwiseTrainer (got "
                f"{self.args.gradient_accumulation_steps}); the chunks of a batch replace accumulation, so "
                "raise per_device_train_batch_size instead"
            )
        self.schedule, self.options, self.seed = schedule, options, seed
        self.last_stats: ChunkStats | None = None

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
        # The project trainer's draw of the same step (its steps count from 1, the Trainer's from 0).
        generator = spaco_generator(self.seed, self.state.global_step + 1)
        with self.compute_loss_context_manager():
            # num_items_in_batch is not passed on: the Trainer counts labels before the shift by one;
            # chunk-wise backprop counts the shifted targets over all ranks itself (HF's loss definition).
            stats = chunkwise_backward(
                model, **_batch(inputs), schedule=self.schedule, options=self.options, generator=generator
            )
        if self.is_deepspeed_enabled:
            # accelerate steps the DeepSpeed engine inside accelerator.backward, which chunk-wise backprop
            # replaces (one engine.backward per chunk); the Trainer's optimizer.step is then a no-op.
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


def _batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a collated batch that a chunk-wise step takes (`input_ids` required)."""
    names = ("labels", "attention_mask", "position_ids")
    return {"input_ids": inputs["input_ids"], **{n: inputs.get(n) for n in names}}
