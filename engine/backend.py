"""Where chunk-wise backprop meets the training backend: a plain module, or a DeepSpeed engine.

The algorithm (engine/chunkwise.py) asks its backend four things: agree on the step's shape with the other
data-parallel ranks, sum a number over them, backprop one chunk, and wrap pass 2 in whatever makes the
gradient reduction happen once per optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class LocalBackend:
    """A plain (PEFT-wrapped or not) transformers model in one process."""

    world_size = 1
    must_backward = False  # nothing to synchronise: an empty SpaCO draw simply adds nothing
    accumulates_fp32 = False  # 16-bit .grad needs our own float32 accumulation across chunks

    def __init__(self, model):
        self.module = model

    def agree(self, seq_len: int, num_tokens: int) -> tuple[int, int]:
        return seq_len, num_tokens

    def total(self, x: float) -> float:
        return x

    def any_rank(self, flags: list[bool]) -> list[bool]:
        return list(flags)

    def step_context(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        loss.backward()


class DeepSpeedBackend:
    """A `deepspeed.DeepSpeedEngine`. Every data-parallel rank must issue the same number of chunk forwards
    and backwards, or ZeRO's collectives deadlock: ranks pad to the longest sequence and draw with one seed.
    The loss is normalised by the *global* token count and multiplied by the world size, since DeepSpeed
    averages gradients over ranks: the update then equals one process training on the whole global batch."""

    must_backward = True  # ZeRO's hooks and reductions expect a backward in every step, on every rank
    accumulates_fp32 = True  # DeepSpeed keeps its own (fp32 for bf16/fp16) gradient accumulation

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module
        self.group = getattr(engine, "data_parallel_group", None)
        self.world_size = dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def agree(self, seq_len: int, num_tokens: int) -> tuple[int, int]:
        (longest,) = self._reduce([seq_len], dist.ReduceOp.MAX)
        (tokens,) = self._reduce([num_tokens], dist.ReduceOp.SUM)
        return int(longest), int(tokens)

    def total(self, x: float) -> float:
        return self._reduce([x], dist.ReduceOp.SUM)[0]

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Per-chunk flags OR-ed over ranks (the SFT SpaCO policy: every rank must draw the same chunks)."""
        return [v > 0 for v in self._reduce([float(f) for f in flags], dist.ReduceOp.MAX)]

    def step_context(self):
        # ZeRO 1/2/3 can defer all reduction to one flush at the end of the step; stage 0 and the bf16/fp16
        # optimizer wrappers reduce at the accumulation boundary we set on the last backward instead.
        # A step context the caller already holds (micro-batches of one optimizer step) is joined, not nested.
        e = self.engine
        if getattr(e.optimizer, "_coalesce_grad_reduction", False):
            return contextlib.nullcontext()
        if e.zero_optimization_stage() in (1, 2, 3) and hasattr(e.optimizer, "_coalesce_grad_reduction"):
            return e.coalesce_grad_reduction()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_last)
        # The loss is already normalised by the step's global token count: DeepSpeed must not also divide it by
        # its own gradient_accumulation_steps (which HF's Trainer sets to its accumulation).
        self.engine.backward(loss, scale_wrt_gas=False)


def backend_for(model):
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # deepspeed is a dependency, but the algorithm does not need it
        return LocalBackend(model)
    return DeepSpeedBackend(model) if isinstance(model, DeepSpeedEngine) else LocalBackend(model)
