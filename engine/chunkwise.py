"""Chunk-wise backprop: SeCO (exact) and SpaCO (sparse, unbiased). The paper's Algorithms 1 and 2 live here.

    targets  = labels shifted by one on the *whole* sequence, so a chunk's last token targets the next chunk's
               first token; loss = sum of CE over valid targets / number of valid targets (HF's definition)
    pass 1   (no grad)  for c = 0 .. k-1: run chunk c against the cached prefix; its K/V become checkpoints
    draw     SeCO: every chunk; SpaCO: each chunk with probability q (or t of k), weight w = 1/q (or k/t)
    pass 2   for c in the drawn chunks, last to first: re-run chunk c with grad against the cached prefix and
             backprop  w * (loss_c + <KV_c, G_c>),  where G_c is what later chunks deposited on chunk c's KV
             (engine/kv_cache.py does the deposit and the relay inside autograd); free the chunk's graph.

Only one chunk's graph is alive at a time; the K/V checkpoints and their gradients (kv_grad_dtype, bfloat16
by default for bf16 models) are the only state that grows with the sequence (docs/design.md section 4).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.attention import chunk_attention
from engine.distributed import backend_for
from engine.kv_cache import ChunkKVCache, cache_argument, kv_grad_dtype_of, offload_mode
from engine.layer_checkpoint import checkpointed_layers, hf_checkpointing_taken_over
from engine.loss import FusedLoss
from engine.moe import RouterLoss
from engine.packing import IGNORE, check_position_ids, chunk_mask, documents_of
from engine.schedule import MODES, SAMPLERS, ChunkSchedule, draw_chunks
from engine.sequence_parallel import HeadShardedKVLayer, SequenceStep
from engine.state_cache import RECURRENT_LAYER_TYPES, check_family, has_states
from engine.step_state import Fp32GradAccumulation, RngReplay

__all__ = ["MODES", "SAMPLERS", "ChunkSchedule", "ChunkStats", "chunkwise_backward", "draw_chunks"]


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
    schedule: ChunkSchedule | None = None,
    chunk_size: int | None = None,
    mode: str = "seco",
    sample_prob: float | None = None,
    sampler: str = "bernoulli",
    budget: int | None = None,
    selected=None,
    generator: torch.Generator | None = None,
    num_items_in_batch: int | None = None,
    compensation_cap: float | None = None,
    offload_kv: bool | str = False,
    kv_device_budget: int | None = None,
    kv_grad_dtype: str = "bfloat16",
    checkpoint_layers: bool = False,
    fused_loss: bool = False,
    loss_slice: int = 128,
    sequence_group=None,
) -> ChunkStats:
    """Add to every trainable parameter's .grad the gradient (SeCO) or an unbiased estimate of it (SpaCO) of
    `model(input_ids, labels=labels, attention_mask=attention_mask).loss`, one chunk's graph at a time.

    The chunking is `schedule` (engine/schedule.py), or built from the loose arguments of the same names
    (chunk_size, mode, sample_prob, sampler, budget, selected, compensation_cap). `model` may also be a
    `deepspeed.DeepSpeedEngine`: chunks then run and backprop through the engine, and the caller calls
    `engine.step()` (engine/distributed). `num_items_in_batch` overrides the (global) token count the loss
    is divided by, as HF's argument of that name. `position_ids` in HF's packed convention (restarting at 0
    per document) make documents packed into one row independent (engine/packing.py). `offload_kv` keeps the
    K/V checkpoints and their gradients in (pinned) host memory, fetched layer by layer (engine/kv_cache.py);
    `offload_kv="auto"` keeps layers on the device while they fit in `kv_device_budget` bytes and only the
    rest on the host. `kv_grad_dtype` ("float32" | "bfloat16") is what K/V gradients accumulate in,
    never below the K/V's dtype (float32 / float64 models keep theirs; only bf16 models can get bfloat16).
    `checkpoint_layers` recomputes each decoder layer in the chunk's backward
    (engine/layer_checkpoint.py); a model with transformers' gradient checkpointing enabled gets that
    instead for the step (transformers' own drops the cache), its flags restored after. `fused_loss` computes
    each chunk's loss `loss_slice` tokens (per row) at a time, never materialising the chunk's logits
    (engine/loss.py). `sequence_group` (engine/sequence_parallel.py's SequenceGroup) splits every chunk over
    the ranks that share these rows; a DeepSpeed engine initialised with the sequence-parallel mpu brings its
    own.
    """
    loose = dict(chunk_size=chunk_size, mode=mode, sample_prob=sample_prob, sampler=sampler, budget=budget)
    loose.update(selected=None if selected is None else tuple(selected), compensation_cap=compensation_cap)
    if schedule is None:
        schedule = ChunkSchedule(**loose)
    elif any(loose[n] != _LOOSE_DEFAULTS[n] for n in loose):
        raise ValueError(
            "pass the chunking either as schedule= or as loose arguments (chunk_size, mode, ...)"
        )
    _check_tensors(input_ids, labels, attention_mask, position_ids)
    backend = backend_for(model)
    module = backend.module  # the transformers (or PEFT) model itself, for its config
    _check_model(module)
    if labels is None:  # like a causal-LM collator: learn every real token, never padding
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE)
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    docs = None if position_ids is None else documents_of(position_ids)
    if docs is not None:
        targets = docs.cut_targets(targets)
    recurrent = has_states(_config(module))  # linear-attention / SSM layers: states at chunk boundaries
    sp = SequenceStep.of(backend, sequence_group, _config(module), schedule.chunk_size)
    seq_len, num_tokens = backend.agree(input_ids.shape[1], int((targets != IGNORE).sum()))
    if sp is not None:
        seq_len, num_tokens = sp.padded_length(seq_len), sp.row_tokens(num_tokens)
    if num_items_in_batch is not None:
        num_tokens = int(num_items_in_batch)
    input_ids, targets, attention_mask, position_ids = _pad_to(
        seq_len, input_ids, targets, attention_mask, position_ids, _pad_id(module)
    )
    router = RouterLoss.for_model(module, attention_mask)  # None unless the loss has a router term
    if position_ids is None:
        position_ids = (
            torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)
        )
    docs = None if docs is None else documents_of(position_ids)  # padded tail included
    if docs is not None and docs.doc_ids is None:
        docs = None  # one document per row: plain causal masks
    size = schedule.chunk_size
    chunks = [(s, min(s + size, seq_len)) for s in range(0, seq_len, size)]
    k = len(chunks)
    has_loss = [bool((targets[:, s:e] != IGNORE).any()) for s, e in chunks]
    # The SFT policy's q_c depend on where the loss tokens are: OR-ed over ranks, so all ranks draw alike.
    policy_flags = backend.any_rank(has_loss) if schedule.loss_chunks == "always" else None
    draw = draw_chunks(schedule, k, generator, policy_flags)
    if sp is not None:
        sp.check_draw(draw.selected, k)
    weight_of = draw.weight_of()
    # DeepSpeed ranks must all backprop at least once per step: an empty draw becomes one zero-weight pass.
    order = sorted(draw.selected, reverse=True) or ([k - 1] if backend.must_backward else [])

    # Packed rows: chunk c reads keys from lo[c]; chunk c's K/V are read later only if lo[c + 1] < its end.
    lo = [0 if docs is None else docs.kv_start(s) for s, _ in chunks]
    read_later = [c + 1 < k and lo[c + 1] < chunks[c][1] for c in range(k)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    needs_kv_grad = bool(order) and bool(trainable) and any(read_later)
    if recurrent and docs is not None:
        raise ValueError(
            f"{_config(module).model_type}: packed documents (position_ids restarting per document) are not "
            "supported for models with recurrent layers: their state would flow from one document into the next"
        )
    if recurrent and checkpoint_layers and size == 1:
        raise ValueError(
            f"{_config(module).model_type}: checkpoint_layers with chunk_size 1 is not supported for models with "
            "recurrent layers: their single-token kernels overwrite the state in place, also in the recompute"
        )
    cache = ChunkKVCache(
        _num_layers(module),
        seq_len,
        needs_grad=needs_kv_grad,
        offload=offload_mode(offload_kv),
        grad_dtype=kv_grad_dtype_of(kv_grad_dtype),
        device_budget=kv_device_budget,
        config=_config(module) if recurrent else None,
        kv_layer=HeadShardedKVLayer if sp is not None else None,
        sequence=None if sp is None else sp.group,
    )
    dtype = next(module.parameters()).dtype

    # Chunks that pass 2 recomputes get their loss there: pass 1 skips their LM head (a large share of a
    # forward when the vocabulary is large) and keeps only their K/V; so do chunks without loss tokens.
    recomputed = set(draw.selected)
    skip_head = {"logits_to_keep": 1} if _accepts_logits_to_keep(module) else {}
    cache_arg = cache_argument(module)
    fused = None
    if fused_loss:  # checks the model's logits on one token per row first (engine/loss.py)
        fused = FusedLoss.build(
            module,
            loss_slice * input_ids.shape[0],
            lambda: (
                model(input_ids=input_ids[:, :1], position_ids=position_ids[:, :1], use_cache=False).logits
            ),
        )

    def run_chunk(c: int, with_loss: bool = True) -> torch.Tensor | None:
        """Summed CE of chunk c, run against the K/V of chunks 0..c-1 already in the cache."""
        s, e = chunks[c]
        with_loss = with_loss and (has_loss[c] or not skip_head)
        cache.begin_chunk(s, relay=weight_of.get(c, 0.0) if read_later[c] else 0.0, kv_start=lo[c])
        extra = {}
        if sp is not None:  # this rank's tokens; attention gets the whole chunk's mask from the shard
            extra = sp.chunk_kwargs(docs, s, e, lo[c], dtype, input_ids.shape[0], input_ids.device)
            (s, e), mask = sp.group.shard(s, e), None
        elif docs is None:
            mask = None if attention_mask is None else attention_mask[:, :e]
        else:
            mask = chunk_mask(_config(module), docs, attention_mask, s, e, lo[c], dtype)
        fused_chunk = (
            fused.chunk(targets[:, s:e]) if fused is not None and with_loss else contextlib.nullcontext()
        )
        with (
            fused_chunk as fused_out,
            cache.saved_kv_offloaded(),
            router.capture(s, e) if router else contextlib.nullcontext(),
        ):
            out = model(
                input_ids=input_ids[:, s:e],
                attention_mask=mask,
                position_ids=position_ids[:, s:e],
                **{cache_arg: cache},
                **extra,
                use_cache=True,
                **({} if with_loss else skip_head),
                # HF's own router loss would pair this chunk's logits with the prefix's mask: we add it
                **({"output_router_logits": False} if router else {}),
            )
        if with_loss:
            if fused_out is not None:  # the model's logits are empty: the loss came from the hook
                return fused_out.loss
            return _ce_sum(out.logits, targets[:, s:e])
        # No loss tokens here: the chunk still relays later chunks' K/V gradient into the parameters, and
        # the (one-token) logits are the root that backward starts from.
        return out.logits.sum() * 0.0 if torch.is_grad_enabled() else None

    # Pass 1: every chunk, no graph. The K/V checkpoints fill up; the loss is exact for logging.
    # Any train-mode forward may draw random numbers (dropout, PhiMoE's jittered / Gumbel routing, LoRA
    # dropout): replay them all rather than guess which modules are stochastic.
    rng = RngReplay(input_ids.device, active=module.training)
    loss_sum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
    attention = chunk_attention if sp is None else sp.forward_context
    with torch.no_grad(), attention(_config(module)):
        for c in range(k):
            rng.save(c)
            ce = run_chunk(c, with_loss=c not in recomputed or not skip_head)
            if router:
                router.observe()  # routing counts: the aux loss's f_e is complete after pass 1
            if c not in recomputed and ce is not None:
                loss_sum += ce
    rng.save("end")
    if sp is not None and router:
        sp.reduce_router(router)

    # Pass 2: drawn chunks in reverse; each backward deposits on earlier chunks' K/V gradients. DeepSpeed
    # averages gradients over ranks, hence the world size against the global token count.
    scale = (
        backend.world_size / max(num_tokens, 1)
        if sp is None
        else sp.grad_scale(backend.world_size, num_tokens)
    )
    before = [] if sp is None else sp.grads_before(trainable)
    with (
        Fp32GradAccumulation(trainable, enabled=not backend.accumulates_fp32),
        backend.step_context(),
        attention(_config(module)),
        # transformers' own checkpointing would drop the cache in every layer: ours replaces it, cache kept
        # (except where it cannot recompute exactly: recurrent layers' single-token kernels, see above)
        hf_checkpointing_taken_over(module) as hf_checkpointing,
        checkpointed_layers(
            module, checkpoint_layers or (hf_checkpointing and not (recurrent and size == 1))
        ),
    ):
        for i, c in enumerate(order):
            rng.restore(c)  # dropout masks of the recompute equal pass 1's
            ce = run_chunk(c)
            if c in recomputed and has_loss[c]:
                loss_sum += ce.detach()
            objective = ce * scale
            if router:  # per rank, not times the world size: HF's aux is each rank's own (engine/moe.py)
                objective = objective + router.chunk_share() * (1.0 if sp is None else sp.router_factor)
            objective = cache.with_state_relays(objective * weight_of.get(c, 0.0))  # recurrent states' relay
            backend.backward(objective, is_last=i == len(order) - 1)
    rng.restore("end")  # the caller's RNG stream continues as after one forward
    if sp is not None:
        sp.finish(trainable, before)
        loss_sum = sp.total_loss(loss_sum)
    loss_sum = backend.total(float(loss_sum))
    aux = None if router is None else backend.total(router.value()) / backend.world_size

    return ChunkStats(
        loss=(loss_sum / num_tokens if num_tokens else float("nan")) + (router.coef * aux if router else 0.0),
        num_tokens=num_tokens,
        num_chunks=k,
        selected=draw.selected,
        compensation=max(draw.weights, default=0.0),
        seq_len=seq_len,
        chunk_size=size,
        kv_bytes=cache.kv_bytes(),
        aux_loss=aux,
        weights=draw.weights,
    )


_LOOSE_DEFAULTS = dict(
    chunk_size=None, mode="seco", sample_prob=None, sampler="bernoulli", budget=None, selected=None
) | {"compensation_cap": None}


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Like HF's loss, compute in float32 at least; float64 models keep float64 (the exactness reference).
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.flatten(0, 1).to(dtype),
        targets.flatten().to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _check_tensors(input_ids, labels, attention_mask, position_ids) -> None:
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


def _accepts_logits_to_keep(module) -> bool:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # PEFT wraps the HF model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _pad_to(seq_len, input_ids, targets, attention_mask, position_ids, pad_id):
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


def _pad_id(model) -> int:
    pad = getattr(_config(model), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _num_layers(model) -> int:
    return _config(model).num_hidden_layers


# chunked_attention (Llama-4): a mask pattern like a sliding window, built by the model from absolute
# positions (our cache reports kv offset 0), so chunks need nothing else.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def _check_model(model) -> None:
    """Refuse, with the reason, models whose recompute could not reproduce pass 1 through our cache."""
    cfg = _config(model)
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
