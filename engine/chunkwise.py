"""Chunk-wise backprop: SeCO (exact) and SpaCO (sparse, unbiased). The paper's Algorithms 1 and 2 live here.

    targets  = labels shifted by one on the *whole* sequence, so a chunk's last token targets the next chunk's
               first token; loss = sum of CE over valid targets / number of valid targets (HF's definition)
    pass 1   (no grad)  for c = 0 .. k-1: run chunk c against the cached prefix; its K/V become checkpoints
    draw     SeCO: every chunk; SpaCO: each chunk with probability q (or t of k), weight w = 1/q (or k/t)
    pass 2   for c in the drawn chunks, last to first: re-run chunk c with grad against the cached prefix and
             backprop  w * (loss_c + <KV_c, G_c>),  where G_c is what later chunks deposited on chunk c's KV
             (engine/kv_cache.py does the deposit and the relay inside autograd); free the chunk's graph.

Only one chunk's graph is alive at a time; the K/V checkpoints and their float32 gradients are the only
state that grows with the sequence (docs/design.md section 4).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import chunk_attention
from engine.distributed import backend_for
from engine.kv_cache import ChunkKVCache

IGNORE = -100
MODES = ("seco", "spaco")
SAMPLERS = ("bernoulli", "fixed")


@dataclass
class ChunkStats:
    loss: float  # the full-sequence loss: exact also under SpaCO (unvisited chunks' loss comes from pass 1)
    num_tokens: int  # valid target tokens the loss is averaged over
    num_chunks: int
    selected: list[int]  # chunks back-propagated in pass 2
    compensation: float  # weight w of every back-propagated chunk (1.0 for SeCO)
    seq_len: int
    chunk_size: int
    kv_bytes: int = 0  # K/V checkpoints + K/V gradients held during the step


def chunkwise_backward(
    model,
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int,
    mode: str = "seco",
    sample_prob: float | None = None,
    sampler: str = "bernoulli",
    budget: int | None = None,
    selected=None,
    generator: torch.Generator | None = None,
    num_items_in_batch: int | None = None,
    compensation_cap: float | None = None,
    offload_kv: bool = False,
) -> ChunkStats:
    """Add to every trainable parameter's .grad the gradient (SeCO) or an unbiased estimate of it (SpaCO) of
    `model(input_ids, labels=labels, attention_mask=attention_mask).loss`, one chunk's graph at a time.

    `model` may also be a `deepspeed.DeepSpeedEngine`: chunks then run and backprop through the engine, and
    the caller calls `engine.step()` (engine/distributed.py). `num_items_in_batch` overrides the (global)
    token count the loss is divided by, as HF's argument of that name. `compensation_cap` caps the fixed
    sampler's weight k/t (trading bias for variance). `offload_kv` keeps the K/V checkpoints and their
    gradients in (pinned) host memory, fetched layer by layer (engine/kv_cache.py).
    """
    _check_args(input_ids, labels, attention_mask, chunk_size, mode, sample_prob, sampler, budget, selected)
    backend = backend_for(model)
    module = backend.module  # the transformers (or PEFT) model itself, for its config
    _check_model(module)
    if labels is None:  # like a causal-LM collator: learn every real token, never padding
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE)
    local_tokens = int((labels[:, 1:] != IGNORE).sum())
    seq_len, num_tokens = backend.agree(input_ids.shape[1], local_tokens)
    if num_items_in_batch is not None:
        num_tokens = int(num_items_in_batch)
    input_ids, labels, attention_mask = _pad_to(seq_len, input_ids, labels, attention_mask, _pad_id(module))
    batch = input_ids.shape[0]
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    chunks = [(s, min(s + chunk_size, seq_len)) for s in range(0, seq_len, chunk_size)]
    k = len(chunks)
    chosen, weight = draw_chunks(k, mode, sample_prob, sampler, budget, selected, generator, compensation_cap)
    # DeepSpeed ranks must all backprop at least once per step: an empty draw becomes one zero-weight pass.
    order = sorted(chosen, reverse=True) or ([k - 1] if backend.must_backward else [])
    weight = weight if chosen else 0.0

    trainable = [p for p in model.parameters() if p.requires_grad]
    cache = ChunkKVCache(
        _num_layers(module), seq_len, needs_grad=bool(order) and bool(trainable), offload=offload_kv
    )
    position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(batch, -1)

    # Chunks that pass 2 recomputes get their loss there: pass 1 skips their LM head (a large share of a
    # forward when the vocabulary is large) and keeps only their K/V.
    recomputed = set(chosen)
    skip_head = {"logits_to_keep": 1} if _accepts_logits_to_keep(module) else {}
    cache_arg = _cache_argument(module)

    def run_chunk(c: int, with_loss: bool = True) -> torch.Tensor | None:
        """Summed CE of chunk c, run against the K/V of chunks 0..c-1 already in the cache."""
        s, e = chunks[c]
        cache.begin_chunk(s, relay=weight)
        with cache.saved_kv_offloaded():
            out = model(
                input_ids=input_ids[:, s:e],
                attention_mask=None if attention_mask is None else attention_mask[:, :e],
                position_ids=position_ids[:, s:e],
                **{cache_arg: cache},
                use_cache=True,
                **({} if with_loss else skip_head),
            )
            return _ce_sum(out.logits, targets[:, s:e]) if with_loss else None

    # Pass 1: every chunk, no graph. The K/V checkpoints fill up; the loss is exact for logging.
    rng = _RngReplay(input_ids.device, active=_has_active_dropout(module))
    loss_sum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
    with torch.no_grad(), chunk_attention(_config(module)):
        for c in range(k):
            rng.save(c)
            ce = run_chunk(c, with_loss=c not in recomputed or not skip_head)
            if c not in recomputed:
                loss_sum += ce
    rng.save("end")

    # Pass 2: drawn chunks in reverse; each backward deposits on earlier chunks' K/V gradients. DeepSpeed
    # averages gradients over ranks, hence the world size against the global token count.
    scale = weight * backend.world_size / max(num_tokens, 1)
    with (
        _Fp32GradAccumulation(trainable, enabled=not backend.accumulates_fp32),
        backend.step_context(),
        chunk_attention(_config(module)),
    ):
        for i, c in enumerate(order):
            rng.restore(c)  # dropout masks of the recompute equal pass 1's
            ce = run_chunk(c)
            if c in recomputed:
                loss_sum += ce.detach()
            backend.backward(ce * scale, is_last=i == len(order) - 1)
    rng.restore("end")  # the caller's RNG stream continues as after one forward
    loss_sum = backend.total(float(loss_sum))

    return ChunkStats(
        loss=loss_sum / num_tokens if num_tokens else float("nan"),
        num_tokens=num_tokens,
        num_chunks=k,
        selected=sorted(chosen),
        compensation=weight if chosen else 0.0,
        seq_len=seq_len,
        chunk_size=chunk_size,
        kv_bytes=cache.kv_bytes(),
    )


def draw_chunks(
    k, mode, sample_prob, sampler, budget, selected, generator, cap=None
) -> tuple[list[int], float]:
    """Which chunks pass 2 visits, and the weight w each carries.

    Bernoulli(q), w = 1/q: a gradient path through p distinct chunks survives with probability q^p and carries
    p factors 1/q (one per chunk's loss or relay on it), so every path, hence the gradient, is unbiased.
    Fixed t-of-k (the paper's Algorithm 2), w = k/t: paths through p >= 2 chunks survive with probability
    t(t-1)..(t-p+1) / (k(k-1)..(k-p+1)) < (t/k)^p, so they are under-weighted: biased, see the README.
    """
    if mode == "seco":
        return list(range(k)), 1.0
    if sampler == "bernoulli":
        weight = 1.0 / sample_prob
        if selected is None:
            u = torch.rand(k, generator=generator)
            selected = [c for c in range(k) if u[c] < sample_prob]
    else:
        t = len(selected) if selected is not None else (budget or max(1, round(sample_prob * k)))
        if t > k:
            raise ValueError(f"budget={t} is larger than the number of chunks ({k})")
        weight = k / t
        if selected is None:
            selected = torch.randperm(k, generator=generator)[:t].tolist()
    if cap is not None:
        weight = min(weight, cap)
    chosen = sorted({int(c) for c in selected})
    if any(c < 0 or c >= k for c in chosen):
        raise ValueError(f"selected={list(selected)} must hold chunk indices in [0, {k})")
    return chosen, weight


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Like HF's loss, compute in float32 at least; float64 models keep float64 (the exactness reference).
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.flatten(0, 1).to(dtype),
        targets.flatten().to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )


class _RngReplay:
    """Saves the RNG before each chunk's pass-1 forward and replays it for the recompute (dropout)."""

    def __init__(self, device: torch.device, active: bool):
        self.cuda = device.type == "cuda"
        self.device = device
        self.active, self.states = active, {}

    def save(self, key) -> None:
        if self.active:
            cuda_state = torch.cuda.get_rng_state(self.device) if self.cuda else None
            self.states[key] = (torch.get_rng_state(), cuda_state)

    def restore(self, key) -> None:
        if self.active:
            cpu_state, cuda_state = self.states[key]
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, self.device)


class _Fp32GradAccumulation:
    """Accumulate 16-bit parameters' gradients across chunks in float32, rounding once at the end.

    Plain backprop rounds each weight gradient once; adding k chunk contributions in bf16 rounds k times
    (1.7x the error of plain backprop: docs/design.md 4b). Under DeepSpeed its fp32 accumulation does this.
    """

    def __init__(self, params: list[torch.Tensor], enabled: bool):
        low = (torch.float16, torch.bfloat16)
        self.params = [p for p in params if p.dtype in low] if enabled else []
        self.acc, self.handles = {}, []

    def __enter__(self):
        for p in self.params:
            self.acc[p] = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
            p.grad = None
            self.handles.append(p.register_post_accumulate_grad_hook(self._take))
        return self

    def _take(self, p: torch.Tensor) -> None:
        self.acc[p].add_(p.grad)
        p.grad = None

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for p in self.params:
            p.grad = self.acc.pop(p).to(p.dtype)


def _check_args(input_ids, labels, attention_mask, chunk_size, mode, sample_prob, sampler, budget, selected):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape [batch, seq]")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: a sequence needs at least 2 tokens, got {input_ids.shape[1]}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    for name, t in (("labels", labels), ("attention_mask", attention_mask)):
        if t is not None and tuple(t.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(input_ids.shape)}")
    if attention_mask is not None:
        m = attention_mask.to(torch.int)
        if ((m[:, 1:] - m[:, :-1]) > 0).any():  # a 0 followed by a 1: left or inner padding
            raise ValueError("attention_mask: only right padding is supported (a 0 is followed by a 1)")
    if mode == "seco":
        for name, v in (("sample_prob", sample_prob), ("budget", budget), ("selected", selected)):
            if v is not None:
                raise ValueError(f"{name} is a SpaCO argument; mode='seco' back-propagates every chunk")
        return
    if sample_prob is not None and not (0.0 < sample_prob <= 1.0):
        raise ValueError(f"sample_prob must be in (0, 1], got {sample_prob}")
    if sampler == "bernoulli" and sample_prob is None:
        raise ValueError("sample_prob is required for mode='spaco' with sampler='bernoulli'")
    if sampler == "fixed":
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        if budget is None and sample_prob is None and selected is None:
            raise ValueError("sampler='fixed' needs budget (t) or sample_prob (t = round(q * k))")
        k = math.ceil(input_ids.shape[1] / chunk_size)
        if budget is not None and budget > k:
            raise ValueError(f"budget={budget} is larger than the number of chunks ({k})")


def _cache_argument(module) -> str:
    """transformers 5.24 renamed the models' `past_key_values` argument to `cache` (the old name warns and
    goes in 5.40): pass it by the name the installed version's forward declares."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _accepts_logits_to_keep(module) -> bool:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # PEFT wraps the HF model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _pad_to(seq_len, input_ids, labels, attention_mask, pad_id):
    """Right-pad this rank's batch to the length all ranks agreed on (padding is masked and never a target)."""
    extra = seq_len - input_ids.shape[1]
    if extra == 0:
        return input_ids, labels, attention_mask
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return (
        F.pad(input_ids, (0, extra), value=pad_id),
        F.pad(labels, (0, extra), value=IGNORE),
        F.pad(attention_mask, (0, extra), value=0),
    )


def _pad_id(model) -> int:
    pad = getattr(_config(model), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _num_layers(model) -> int:
    return _config(model).num_hidden_layers


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_model(model) -> None:
    """Refuse, with the reason, models whose recompute could not reproduce pass 1 through our cache."""
    cfg = _config(model)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{cfg.model_type}: encoder-decoder models are not supported (causal LMs only)")
    layer_types = getattr(cfg, "layer_types", None) or []
    other = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if other:
        raise ValueError(
            f"{cfg.model_type}: layers of type {other} keep a recurrent/hybrid cache that chunk-wise training "
            f"cannot checkpoint; supported layer types are {SUPPORTED_LAYER_TYPES}"
        )
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise ValueError(f"{cfg.model_type}: KV sharing across layers is not supported")


def _has_active_dropout(model) -> bool:
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = _config(model)
    return any(
        isinstance(v, float) and v > 0
        for n, v in vars(cfg).items()
        if "dropout" in n and "classifier" not in n
    )
