"""Chunk-wise scoring without a graph: pass 1 of chunk-wise backprop on its own, for evaluation.

The sequence runs chunk by chunk against the K/V cache of the chunks before it, under `torch.no_grad`, so
scoring a sequence costs what pass 1 of a training step costs (K/V of the prefix plus one chunk's
activations): every length that trains also evaluates, where a plain forward holds every layer's
activations and the whole sequence's logits at once.

Targets are those of the training loss (labels shifted by one on the whole sequence, cut at document
boundaries in packed rows), so `loss_sum / num_tokens` is HF's `.loss` of the same rows. Two ways to score:

    loss    the summed cross-entropy; with `fused_loss` a slice of tokens' logits at a time (engine/loss.py)
    argmax  also whether each target is the argmax of its logits (teacher-forced exact match), computing
            logits only at the target positions (`logits_to_keep` with their indices)

MoE models score the language-model loss alone: the router's load-balancing term is not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import chunk_attention
from engine.backend import backend_for
from engine.chunk_runner import accepts_logits_to_keep, ce_sum, check_model
from engine.documents import IGNORE, document_mask, documents_of
from engine.kv_cache import ChunkKVCache, cache_argument
from engine.loss import FusedLoss
from engine.options import ChunkOptions
from engine.state_cache import has_states
from engine.step_plan import check_inputs
from engine.unwrap import text_config


@dataclass
class Scores:
    loss_sum: float  # summed cross-entropy over the valid targets, in float64
    num_tokens: int  # valid targets
    row_tokens: torch.Tensor  # [batch] valid targets per row
    row_correct: torch.Tensor | None  # [batch] targets predicted by the argmax (argmax=True only)


@dataclass(frozen=True)
class ScoreOptions:
    """How chunks run: the chunk size and the training step's ChunkOptions (fused_loss, loss_slice,
    offload_kv and kv_device_budget apply; the gradient options have nothing to do without a graph)."""

    chunk_size: int
    options: ChunkOptions = ChunkOptions()

    @classmethod
    def from_config(cls, chunking) -> ScoreOptions:
        return cls(chunking.chunk_size, ChunkOptions.from_config(chunking))


def targets_of(input_ids, labels, attention_mask, position_ids) -> torch.Tensor:
    """The training loss's targets: labels shifted by one, never across a document boundary."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE)
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        targets = documents_of(position_ids).cut_targets(targets)
    return targets


@torch.no_grad()
def score(
    model,
    input_ids: torch.Tensor,
    *,
    options: ScoreOptions,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    argmax: bool = False,
) -> Scores:
    """Score a batch chunk by chunk; `model` is an HF (or PEFT) causal LM or a DeepSpeed engine. The
    caller puts the model in eval mode (no dropout) and, under ZeRO-3, runs the same number of calls with
    the same sequence length on every rank (each chunk's forward gathers parameters)."""
    check_inputs(input_ids, labels, attention_mask, position_ids)
    module = backend_for(model).module
    check_model(module)
    cfg = text_config(module.config)
    targets = targets_of(input_ids, labels, attention_mask, position_ids)
    seq_len = input_ids.shape[1]
    docs = None if position_ids is None else documents_of(position_ids)
    if docs is not None and docs.doc_ids is None:
        docs = None
    if docs is not None and has_states(cfg):
        raise ValueError(f"{cfg.model_type}: packed rows are not supported for models with recurrent layers")
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device).expand(input_ids.shape[0], -1)
    cache = ChunkKVCache(
        cfg.num_hidden_layers,
        seq_len,
        needs_grad=False,
        offload=options.options.offload_kv,
        device_budget=options.options.kv_device_budget,
        config=cfg if has_states(cfg) else None,
    )
    fused = None
    if options.options.fused_loss and not argmax:
        fused = FusedLoss.build(
            module,
            options.options.loss_slice * input_ids.shape[0],
            lambda: (
                model(input_ids=input_ids[:, :1], position_ids=position_ids[:, :1], use_cache=False).logits
            ),
        )
    run = _ChunkRunner(model, module, cache, docs, attention_mask, input_ids, position_ids)
    loss_sum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
    correct = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device) if argmax else None
    with chunk_attention(cfg):
        for s in range(0, seq_len, options.chunk_size):
            e = min(s + options.chunk_size, seq_len)
            chunk_targets = targets[:, s:e]
            if not (chunk_targets != IGNORE).any():
                run(s, e, skip_head=True)  # only the cache fills up
            elif argmax:
                keep = (chunk_targets != IGNORE).any(dim=0).nonzero().flatten()
                logits = run(s, e, keep=keep)
                kept = chunk_targets[:, keep]
                loss_sum += ce_sum(logits, kept).double()
                correct += ((logits.argmax(-1) == kept) & (kept != IGNORE)).sum(dim=1)
            elif fused is not None:
                with fused.chunk(chunk_targets) as result:
                    run(s, e)
                loss_sum += result.loss.double()
            else:
                loss_sum += ce_sum(run(s, e), chunk_targets).double()
    row_tokens = (targets != IGNORE).sum(dim=1)
    return Scores(float(loss_sum), int(row_tokens.sum()), row_tokens, correct)


class _ChunkRunner:
    """Runs one chunk [s, e) against the cache of the chunks before it; returns its logits (all of the
    chunk's, or those at the `keep` positions, or none with `skip_head`)."""

    def __init__(self, model, module, cache, docs, attention_mask, input_ids, position_ids):
        self.model, self.module, self.cache, self.docs = model, module, cache, docs
        self.attention_mask, self.input_ids, self.position_ids = attention_mask, input_ids, position_ids
        self.cache_arg = cache_argument(module)
        self.logits_to_keep = accepts_logits_to_keep(module)
        self.dtype = next(module.parameters()).dtype
        cfg = text_config(module.config)
        # HF's router term would pair this chunk's logits with the prefix's mask; it is no part of the score.
        self.extra = {"output_router_logits": False} if getattr(cfg, "output_router_logits", False) else {}

    def __call__(self, s: int, e: int, keep: torch.Tensor | None = None, skip_head: bool = False):
        kv_start = 0 if self.docs is None else self.docs.kv_start(s)
        self.cache.begin_chunk(s, relay=0.0, kv_start=kv_start)
        if self.docs is None:
            mask = None if self.attention_mask is None else self.attention_mask[:, :e]
        else:
            mask = document_mask(
                text_config(self.module.config), self.docs, self.attention_mask, s, e, kv_start, self.dtype
            )
        head = {}
        if self.logits_to_keep and skip_head:
            head = {"logits_to_keep": 1}
        elif self.logits_to_keep and keep is not None:
            head = {"logits_to_keep": keep}
        out = self.model(
            input_ids=self.input_ids[:, s:e],
            attention_mask=mask,
            position_ids=self.position_ids[:, s:e],
            **{self.cache_arg: self.cache},
            use_cache=True,
            **head,
            **self.extra,
        )
        if skip_head:
            return None
        logits = out.logits
        if keep is not None and not self.logits_to_keep:
            logits = logits[:, keep]
        return logits
