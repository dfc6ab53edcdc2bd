"""Runs one chunk of a planned step against the cached prefix; owns the step's K/V (and state) cache.

`ChunkRunner.run(c, grad)` is one forward of chunk c: the cache pointed at the chunk, its mask (packed
documents), the concerns (engine/concerns.py) around it, and its summed cross-entropy. `objective` is what
pass 2 back-propagates for that chunk before its weight. Under sequence parallelism (engine/
sequence_parallel.py) a rank runs its shard of every chunk and the K/V cache holds its heads. `check_model`
refuses models whose recompute could not reproduce pass 1 through the cache.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.attention import chunk_attention
from engine.concerns import (
    CacheConcern,
    Chunk,
    ChunkConcern,
    ChunkOutput,
    FusedLossConcern,
    HeadSkip,
    RngConcern,
    RouterConcern,
)
from engine.documents import IGNORE, document_mask
from engine.kv_cache import ChunkKVCache, cache_argument, kv_grad_dtype_of
from engine.loss import FusedLoss
from engine.moe import RouterLoss
from engine.options import ChunkOptions
from engine.sequence_parallel import HeadShardedKVLayer, SequenceStep
from engine.state_cache import RECURRENT_LAYER_TYPES, check_family, has_states
from engine.step_plan import StepPlan
from engine.step_state import RngReplay
from engine.unwrap import base_model, text_config


class ChunkRunner:
    """`model` is what runs a forward (the module, or a DeepSpeed engine); `module` the transformers model.
    `extra` concerns run after the step's own, in order: the last one's forward keywords win."""

    def __init__(
        self,
        model,
        module,
        plan: StepPlan,
        options: ChunkOptions,
        needs_kv_grad: bool,
        sp: SequenceStep | None,
        extra: Sequence[ChunkConcern] = (),
    ):
        self.model, self.module, self.plan, self.sp = model, module, plan, sp
        self.config = text_config(module.config)
        self.router = RouterLoss.for_model(module, plan.attention_mask)  # None: the loss has no router term
        self.recurrent = recurrent = has_states(self.config)  # linear-attention / SSM: states at boundaries
        check_recurrent(self.config, recurrent, plan, options)
        self.cache = ChunkKVCache(
            self.config.num_hidden_layers,
            plan.seq_len,
            needs_grad=needs_kv_grad,
            offload=options.offload_kv,
            grad_dtype=kv_grad_dtype_of(options.kv_grad_dtype),
            device_budget=options.kv_device_budget,
            config=self.config if recurrent else None,
            kv_layer=HeadShardedKVLayer if sp is not None else None,
            sequence=None if sp is None else sp.group,
        )
        self.cache_arg = cache_argument(module)
        self.dtype = next(module.parameters()).dtype
        self.skip_head = accepts_logits_to_keep(module)
        self.concerns = [*self._concerns(options), *extra]
        self.chunk: Chunk | None = None  # the chunk run last

    def _concerns(self, options: ChunkOptions) -> list[ChunkConcern]:
        p = self.plan
        concerns = [RngConcern(RngReplay(p.input_ids.device, active=self.module.training))]
        concerns += [HeadSkip()] if self.skip_head else []
        if options.fused_loss:  # checks the model's logits on one token per row first (engine/loss.py)
            fused = FusedLoss.build(
                self.module,
                options.loss_slice * p.input_ids.shape[0],
                lambda: (
                    self.model(
                        input_ids=p.input_ids[:, :1], position_ids=p.position_ids[:, :1], use_cache=False
                    ).logits
                ),
            )
            concerns += [FusedLossConcern(fused, p.targets)] if fused is not None else []
        concerns.append(CacheConcern(self.cache))
        concerns += [RouterConcern(self.router, self.sp)] if self.router is not None else []
        return concerns

    def run(self, c: int, grad: bool, last: bool = False) -> torch.Tensor | None:
        """Chunk c's summed CE against the K/V of chunks 0..c-1 in the cache; None where pass 1 does not
        compute its loss. Chunks pass 2 recomputes get their loss there: pass 1 skips their LM head and keeps
        only their K/V, as it does for chunks without loss tokens."""
        p = self.plan
        s, e = p.chunks[c]
        with_loss = not self.skip_head or (p.has_loss[c] and (grad or c not in p.recomputed))
        self.cache.begin_chunk(s, relay=p.relay(c), kv_start=p.kv_start[c])
        kwargs, mask = {self.cache_arg: self.cache, "use_cache": True}, self._mask(c)
        if self.sp is not None:  # this rank's tokens; attention gets the whole chunk's mask from the shard
            batch, device = p.input_ids.shape[0], p.input_ids.device
            kwargs.update(self.sp.chunk_kwargs(p.docs, s, e, p.kv_start[c], self.dtype, batch, device))
            (s, e), mask = self.sp.group.shard(s, e), None
        self.chunk = chunk = Chunk(c, s, e, grad, with_loss, last)
        for concern in self.concerns:
            kwargs.update(concern.forward_kwargs(chunk))
        out = ChunkOutput()
        with contextlib.ExitStack() as stack:
            for concern in self.concerns:
                stack.enter_context(concern.around(chunk, out))
            logits = self.model(
                input_ids=p.input_ids[:, s:e], attention_mask=mask, position_ids=p.position_ids[:, s:e],
                **kwargs,
            ).logits  # fmt: skip
        if with_loss:
            return out.loss if out.loss is not None else ce_sum(logits, p.targets[:, s:e])
        # No loss tokens here: the chunk still relays later chunks' K/V gradient into the parameters, and
        # the (one-token) logits are the root that backward starts from.
        return logits.sum() * 0.0 if grad else None

    def objective(self, term: torch.Tensor) -> torch.Tensor:
        """Pass 2's scalar of the chunk just run (before its weight): its loss term and the concerns'."""
        for concern in self.concerns:
            term = concern.objective(self.chunk, term)
        return term

    def attention(self):
        """The attention a chunk runs with (engine/attention.py; engine/sequence_parallel.py's when sharded)."""
        return chunk_attention(self.config) if self.sp is None else self.sp.forward_context(self.config)

    def can_take_over(self, hf_checkpointing: bool) -> bool:
        """Whether our checkpointed layers replace transformers' (which drop the cache); not where they cannot
        recompute exactly: recurrent layers' single-token kernels."""
        return hf_checkpointing and not (self.recurrent and self.plan.chunk_size == 1)

    def loss_scale(self, world_size: int) -> float:
        """DeepSpeed averages gradients over ranks: the world size against the global token count."""
        n = self.plan.num_tokens
        return world_size / max(n, 1) if self.sp is None else self.sp.grad_scale(world_size, n)

    @contextlib.contextmanager
    def sequence_grads(self, params):
        """Pass 2 of a plain model under sequence parallelism: the group's .grad summed at the end."""
        if self.sp is not None:
            self.sp.begin(params)
        yield
        if self.sp is not None:
            self.sp.finish(params)

    def group_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        return loss_sum if self.sp is None else self.sp.total_loss(loss_sum)

    def _mask(self, c: int):
        p = self.plan
        s, e = p.chunks[c]
        if p.docs is None:
            return None if p.attention_mask is None else p.attention_mask[:, :e]
        return document_mask(self.config, p.docs, p.attention_mask, s, e, p.kv_start[c], self.dtype)

    def aux_loss(self, ranks) -> float | None:
        """HF's router aux loss over the step (mean over ranks), None without a router term."""
        return None if self.router is None else ranks.total(self.router.value()) / ranks.world_size


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Like HF's loss, compute in float32 at least; float64 models keep float64 (the exactness reference).
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.flatten(0, 1).to(dtype),
        targets.flatten().to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )


def accepts_logits_to_keep(module) -> bool:
    return "logits_to_keep" in inspect.signature(base_model(module).forward).parameters


def pad_id(module) -> int:
    pad = getattr(text_config(module.config), "pad_token_id", None)
    return 0 if pad is None else int(pad)


# chunked_attention (Llama-4): a mask pattern like a sliding window, built by the model from absolute
# positions (our cache reports kv offset 0), so chunks need nothing else.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def check_model(module) -> None:
    """Refuse, with the reason, models whose recompute could not reproduce pass 1 through our cache."""
    cfg = text_config(module.config)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{cfg.model_type}: encoder-decoder models are not supported (causal LMs only)")
    check_family(cfg)  # recurrent families whose state the Cache API does not carry (engine/state_cache.py)
    layer_types = getattr(cfg, "layer_types", None) or []
    other = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES) - set(RECURRENT_LAYER_TYPES))
    if other:
        raise ValueError(
            f"{cfg.model_type}: layers of type {other} keep a recurrent/hybrid cache that chunk-wise training "
            f"cannot checkpoint; supported layer types are {SUPPORTED_LAYER_TYPES}"
        )
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise ValueError(f"{cfg.model_type}: KV sharing across layers is not supported")


def check_recurrent(cfg, recurrent: bool, plan: StepPlan, options: ChunkOptions) -> None:
    if recurrent and plan.docs is not None:
        raise ValueError(
            f"{cfg.model_type}: packed documents (position_ids restarting per document) are not "
            "supported for models with recurrent layers: their state would flow from one document into the next"
        )
    if recurrent and options.checkpoint_layers and plan.chunk_size == 1:
        raise ValueError(
            f"{cfg.model_type}: checkpoint_layers with chunk_size 1 is not supported for models with "
            "recurrent layers: their single-token kernels overwrite the state in place, also in the recompute"
        )
