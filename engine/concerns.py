"""What a chunk-wise step does besides the two passes, behind one interface the chunk runner calls.

A concern may add keywords to a chunk's forward, wrap that forward, and add to pass 2's objective of the
chunk (before its weight w_c). The runner (engine/chunk_runner.py) calls every concern, in order, on every
chunk; each concern below is a thin adapter over the module that does the work.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.kv_cache import ChunkKVCache
from engine.loss import FusedLoss
from engine.moe import RouterLoss
from engine.step_state import RngReplay


@dataclass(frozen=True)
class Chunk:
    """One forward of one chunk: chunk `index` over tokens [start, end), in pass 1 or (grad) pass 2."""

    index: int
    start: int
    end: int
    grad: bool  # pass 2: the forward builds a graph that is back-propagated
    with_loss: bool  # the forward computes the chunk's loss (else the LM head may be skipped)
    last: bool  # the last forward of its pass


@dataclass
class ChunkOutput:
    loss: torch.Tensor | None = None  # set by a concern that computes the loss itself (the fused loss)


class ChunkConcern:
    """No-op defaults; a concern overrides what it needs."""

    def forward_kwargs(self, chunk: Chunk) -> dict:
        return {}

    def around(self, chunk: Chunk, out: ChunkOutput):
        return contextlib.nullcontext()

    def objective(self, chunk: Chunk, term: torch.Tensor) -> torch.Tensor:
        return term


class RngConcern(ChunkConcern):
    """Any train-mode forward may draw random numbers (dropout, PhiMoE's jittered routing, LoRA dropout):
    pass 1 saves the RNG before each chunk and pass 2 replays it, so the recompute's masks are pass 1's; after
    the last chunk the RNG is where one forward would have left it."""

    def __init__(self, rng: RngReplay):
        self.rng = rng

    @contextlib.contextmanager
    def around(self, chunk: Chunk, out: ChunkOutput):
        (self.rng.restore if chunk.grad else self.rng.save)(chunk.index)
        yield
        if chunk.last:
            (self.rng.restore if chunk.grad else self.rng.save)("end")


class HeadSkip(ChunkConcern):
    """A forward that needs no loss asks the model for one position's logits: the LM head is a large share
    of a forward when the vocabulary is large."""

    def forward_kwargs(self, chunk: Chunk) -> dict:
        return {} if chunk.with_loss else {"logits_to_keep": 1}


class FusedLossConcern(ChunkConcern):
    """The chunk's loss computed slice by slice from the LM head's input (engine/loss.py)."""

    def __init__(self, fused: FusedLoss, targets: torch.Tensor):
        self.fused, self.targets = fused, targets

    @contextlib.contextmanager
    def around(self, chunk: Chunk, out: ChunkOutput):
        if not chunk.with_loss:
            yield
            return
        with self.fused.chunk(self.targets[:, chunk.start : chunk.end]) as result:
            yield
        out.loss = result.loss  # the model's logits are empty: the loss came from the hook


class CacheConcern(ChunkConcern):
    """Saved K/V copies swapped for handles when offloaded, recurrent states protected and relayed
    (engine/kv_cache.py, engine/state_cache.py)."""

    def __init__(self, cache: ChunkKVCache):
        self.cache = cache

    @contextlib.contextmanager
    def around(self, chunk: Chunk, out: ChunkOutput):
        with self.cache.saved_kv_offloaded():
            yield
        self.cache.check_written(chunk.index)  # a model that dropped the cache is never trained on

    def objective(self, chunk: Chunk, term: torch.Tensor) -> torch.Tensor:
        return self.cache.with_state_relays(term)  # an identity whose backward relays the final states


class RouterConcern(ChunkConcern):
    """MoE load-balancing loss (engine/moe.py): routing counts in pass 1, each chunk's share in pass 2."""

    def __init__(self, router: RouterLoss, sequence=None):
        self.router, self.sequence = router, sequence  # sequence: engine/sequence_parallel.py's SequenceStep

    def forward_kwargs(self, chunk: Chunk) -> dict:
        # HF's own router loss would pair this chunk's logits with the prefix's mask: we add it
        return {"output_router_logits": False}

    @contextlib.contextmanager
    def around(self, chunk: Chunk, out: ChunkOutput):
        with self.router.capture(chunk.start, chunk.end):
            yield
        if not chunk.grad:
            self.router.observe()  # the aux loss's routed fractions are complete after pass 1
            if chunk.last and self.sequence is not None:
                self.sequence.reduce_router(self.router)  # each rank saw only its shard of every chunk

    def objective(self, chunk: Chunk, term: torch.Tensor) -> torch.Tensor:
        # Per rank, not times the world size: HF's aux is each rank's own (engine/moe.py); a sequence group
        # scales it as DeepSpeed divides its gradients (engine/sequence_parallel.py)
        factor = 1.0 if self.sequence is None else self.sequence.router_factor
        return term + self.router.chunk_share() * factor
