"""Memory planner: the peak device memory of one chunk-wise training step, and the longest sequence that fits.

    python -m engine.plan --hf-config llama3-8b --device-memory 24GiB --zero-stage 2 --offload-optimizer \\
        --lora-rank 8 --dtype bfloat16 --chunk-sizes 256,512,1024

Python: `plan(config, chunk_size=..., seq_len=..., ...) -> Breakdown`, `longest_sequence(config, device_memory=...,
chunk_size=..., ...) -> int`.

What is modelled (per data-parallel rank, bytes on the accelerator), for a Llama-shaped decoder (RMSNorm,
RoPE, gated SiLU MLP, GQA) trained by engine/chunkwise.py:

    weights, grads, optimizer   as the ZeRO stage / world size / offload flags place them (Adam: two float32
                      moments, plus float32 master weights for 16-bit models; one reduce bucket for ZeRO-2/3)
    grad_accum        chunkwise_backward's float32 sums of 16-bit gradients (backend "local" only; under
                      DeepSpeed the engine's own buffers, counted in grads)
    kv                K/V checkpoints, 2 * layers * kv_heads * head_dim * L * batch in the model dtype
    kv_grads          the same shape in float32 (both in host memory, `kv_host`, with offload_kv)
    activations       what autograd saves for backward of ONE chunk of C tokens, the last one (its keys span
                      the whole sequence): per layer the RMSNorm inputs (float32), the inputs of trainable
                      linears and LoRA adapters, RoPE'd queries, the attention output, the MLP intermediates;
                      growing with L: the K/V copies transformers' repeat_kv makes for GQA when it passes a
                      mask (sdpa and eager on CUDA), sdpa's float mask [C, L] (one, shared by all layers:
                      engine/chunkwise.py builds it additive so SDPA makes no per-layer copy), eager's
                      attention probabilities
    transient         the largest of what backward allocates on top of that: the cross-entropy of the chunk's
                      logits (log-softmax, NLL gradient, log-softmax gradient: float32 [C, vocab] each), the
                      lm_head backward, the top layer's attention backward (gradients over prefix + chunk K/V,
                      model dtype; with offload_kv also its K/V fetched back from the host, the next layer's
                      prefetched, and the float32 deposit staged on the device), the top layer's MLP backward
                      (full fine-tuning)

Every term is affine in L, so the peak is the maximum of a few affine functions and the longest sequence is
solved exactly. The last chunk is taken as a full chunk (an upper bound when C does not divide L).

Checked on CPU against engine.memory.MemoryTracker (tests/test_plan.py: 9 tiny-Llama configurations, GQA/MHA,
fp32/bf16, full/LoRA, sdpa/eager, batch 1/2, every kind of peak; within 3%, asserted within 15%).

NOT modelled, hence `--reserve` (default 1 GiB) and `--margin` (default 10% of the rest): the CUDA context
(~0.3-0.5 GiB) and cuBLAS/NCCL workspaces; allocator caching and fragmentation (commonly 5-15% with
long, varying shapes; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces it); scratch buffers kernels
allocate internally (memory-efficient / flash attention workspaces, their float32 dQ accumulators); DeepSpeed
buffers beyond one reduce bucket and its exact gradient dtype choices; pinned host buffers. Non-Llama families
(QK-norm, biases, parallel residuals, MoE, sliding windows) are approximated by the Llama shape. On CUDA the
attention kernels differ from CPU's (their saved outputs agree, their workspaces do not): the CUDA numbers are
a prediction, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ATTN = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cuda", "cpu")
BACKENDS = ("deepspeed", "local")
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)

# Config fields of a few public models, so no download is needed.
PRESETS: dict[str, dict] = {
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
    ),
    "llama2-7b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-shaped decoder that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """From a transformers config, a dict of its fields, a preset name or a ModelShape."""
        if isinstance(cfg, ModelShape):
            return cfg
        if isinstance(cfg, str):
            if cfg not in PRESETS:
                raise ValueError(f"unknown preset {cfg!r}; known: {', '.join(PRESETS)}")
            cfg = PRESETS[cfg]
        if not isinstance(cfg, Mapping):  # a transformers PretrainedConfig
            cfg = (cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).to_dict()
        cfg = cfg.get("text_config") or cfg  # multimodal wrappers keep the decoder under text_config
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"model config lacks {missing}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return cls(
            hidden=hidden,
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate=cfg.get("intermediate_size") or 4 * hidden,
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of a decoder layer."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        return sum(a * b for a, b in self.linear_dims().values()) + bias + 2 * self.hidden

    def base_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, rank: int, targets) -> int:
        dims = self.linear_dims()
        return self.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


# ---------------------------------------------------------------------------------------------- result


@dataclass
class Breakdown:
    """Predicted peak device memory of one step, by component, in bytes (per data-parallel rank).

    total = weights + grads + optimizer + grad_accum + kv + kv_grads + activations + transient.
    `step_bytes` is the part a step allocates on top of an idle model whose gradients already exist
    (what tests/test_plan.py measures). `host` is what offloading puts in host memory instead (not in total).
    """

    weights: int
    grads: int
    optimizer: int
    grad_accum: int
    kv: int
    kv_grads: int
    activations: int
    transient: int
    peak_phase: str  # which part of backward sets the peak: ce, lm_head, attention, weight_grad, finalize
    # informational (not added to total):
    seq_activations: int = 0  # part of activations growing with L: GQA K/V copies, SDPA masks, eager probs
    kv_host: int = 0  # K/V checkpoints and gradients kept in host memory (offload_kv); part of host
    host: int = 0  # host memory: offloaded optimizer states, fp32 grads, parameters, K/V
    params: int = 0
    trainable: int = 0

    COMPONENTS = (
        "weights", "grads", "optimizer", "grad_accum", "kv", "kv_grads", "activations", "transient",
    )  # fmt: skip

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.COMPONENTS)

    @property
    def step_bytes(self) -> int:
        return self.grad_accum + self.kv + self.kv_grads + self.activations + self.transient


@dataclass(frozen=True)
class _Options:
    """The training setup; validated on construction. Field meanings: see `plan`."""

    chunk_size: int
    dtype: str = "bfloat16"
    batch: int = 1
    zero_stage: int = 0
    world_size: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    lora_dtype: str | None = None
    attn: str = "sdpa"
    repeat_kv: bool | None = None
    backend: str = "deepspeed"
    offload_kv: bool = False
    device: str = "cuda"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("dtype", "lora_dtype"):
            value = getattr(self, name) or self.dtype
            if value not in DTYPE_BYTES:
                raise ValueError(f"{name} {value!r} is not one of {list(DTYPE_BYTES)}")
            set_(name, value)
        for name in ("chunk_size", "batch", "world_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(
                "offload_param needs zero_stage 3 (DeepSpeed offloads parameters only under ZeRO-3)"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        bad = sorted(set(self.lora_targets) - set(LINEARS))
        if bad:
            raise ValueError(f"lora_targets {bad} are not among {LINEARS}")
        set_("lora_targets", tuple(self.lora_targets) if self.lora_rank else ())
        if self.attn not in ATTN:
            raise ValueError(f"attn {self.attn!r} is not one of {ATTN}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {DEVICES}")
        if self.repeat_kv is None:  # see `plan`
            set_("repeat_kv", self.attn == "eager" or (self.attn == "sdpa" and self.device == "cuda"))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.backend == "local" and (self.zero_stage or self.world_size != 1):
            raise ValueError("backend 'local' is one process without ZeRO: zero_stage 0, world_size 1")


# ------------------------------------------------------------------------------------------ public API


def plan(
    model_config,
    *,
    dtype: str = "bfloat16",
    chunk_size: int,
    seq_len: int,
    batch: int = 1,
    zero_stage: int = 0,
    world_size: int = 1,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    lora_rank: int = 0,
    attn: str = "sdpa",
    lora_targets=LORA_DEFAULT_TARGETS,
    lora_dtype: str | None = None,
    repeat_kv: bool | None = None,
    backend: str = "deepspeed",
    offload_kv: bool = False,
    device: str = "cuda",
) -> Breakdown:
    """Predicted peak memory of one chunk-wise step on `seq_len` tokens (per rank, bytes by component).

    model_config: a transformers config, a dict of its fields, a preset name (see PRESETS) or a ModelShape.
    dtype: the model's dtype (bfloat16 / float16 mean mixed precision: Adam keeps float32 master weights).
    zero_stage, world_size, offload_optimizer, offload_param: how DeepSpeed partitions and places the static
        state (ZeRO-1: optimizer states; ZeRO-2: + gradients; ZeRO-3: + weights).
    lora_rank: 0 = full fine-tuning; otherwise LoRA adapters of that rank on `lora_targets`, stored in
        `lora_dtype` (default: the model dtype, as DeepSpeed casts every parameter; PEFT alone keeps them
        in float32).
    attn: "sdpa", "eager" or "flash_attention_2" (transformers' attn_implementation).
    repeat_kv: whether attention gets K/V copied once per query head (GQA). None = what the engine does:
        transformers' sdpa (on CUDA) and eager repeat K/V whenever they pass a mask, which chunks with a
        prefix always do; flash_attention_2 takes grouped heads, and so does sdpa on CPU (engine/chunkwise.py).
    backend: "deepspeed" (the above applies) or "local" (a plain model in one process, torch AdamW, and
        chunkwise_backward's own float32 accumulation of 16-bit gradients).
    offload_kv: chunkwise_backward(offload_kv=True): K/V and their gradients in host memory (`kv_host`),
        one layer's K/V copied to the device at a time (and the next one prefetched, on CUDA).
    device: "cuda" (the planner's purpose) or "cpu" (where tests/test_plan.py measures; no prefetch there).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    opts = _Options(
        chunk_size=chunk_size, dtype=dtype, batch=batch, zero_stage=zero_stage, world_size=world_size,
        offload_optimizer=offload_optimizer, offload_param=offload_param, lora_rank=lora_rank,
        lora_targets=tuple(lora_targets), lora_dtype=lora_dtype, attn=attn, repeat_kv=repeat_kv, backend=backend,
        offload_kv=offload_kv, device=device,
    )  # fmt: skip
    shape = ModelShape.from_config(model_config)
    s, kv, kv_grads, acts, phases = _evaluate(shape, opts, seq_len)
    kv_host = sum(_kv(shape, opts, seq_len)) if opts.offload_kv else 0
    phase = max(phases, key=phases.get)
    seq_acts = acts - _activations(shape, opts, 0)[0]
    return Breakdown(
        weights=s["weights"], grads=s["grads"], optimizer=s["optimizer"], grad_accum=s["grad_accum"],
        kv=kv, kv_grads=kv_grads, activations=acts, transient=phases[phase] - acts, peak_phase=phase,
        seq_activations=seq_acts, kv_host=kv_host, host=s["host"] + kv_host, params=s["params"],
        trainable=s["trainable"],
    )  # fmt: skip


def longest_sequence(
    model_config,
    *,
    device_memory: int | str,
    reserve: int | str = GiB,
    margin: float = 0.10,
    host_memory: int | str | None = None,
    multiple_of: int | None = None,
    **plan_kwargs,
) -> int:
    """The longest sequence whose predicted peak fits in `usable_memory(device_memory, reserve, margin)`
    (and whose host-side state fits in `host_memory`, if given), rounded down to `multiple_of` (default: the
    chunk size); 0 if not even one chunk fits. `plan_kwargs` are those of `plan` except seq_len."""
    shape = ModelShape.from_config(model_config)
    opts = _Options(**plan_kwargs)
    # Each candidate peak (and the host total) is affine in L, a + b*L: evaluate at two lengths and solve.
    at0, at1 = _phase_totals(shape, opts, 0), _phase_totals(shape, opts, 1)
    budget = usable_memory(device_memory, reserve, margin)
    limits = [(budget, at0[phase], at1[phase]) for phase in at0]
    if host_memory is not None:
        limits.append((parse_bytes(host_memory), _host_total(shape, opts, 0), _host_total(shape, opts, 1)))
    longest = math.inf
    for limit, a, a_plus_b in limits:
        if a > limit:
            return 0
        if a_plus_b > a:
            longest = min(longest, (limit - a) / (a_plus_b - a))
    step = multiple_of or opts.chunk_size
    length = int(longest) // step * step
    return length if length >= opts.chunk_size else 0


def usable_memory(device_memory: int | str, reserve: int | str = GiB, margin: float = 0.10) -> int:
    """What the step's tensors may use: device memory minus a fixed reserve (CUDA context, cuBLAS/NCCL
    workspaces) minus a fraction `margin` of the rest (allocator caching and fragmentation)."""
    total, reserve = parse_bytes(device_memory), parse_bytes(reserve)
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    return max(0, int((total - reserve) * (1.0 - margin)))


def parse_bytes(text: int | str) -> int:
    """'24GiB' and '24G' -> 24 * 2**30, '24GB' -> 24 * 10**9, plain numbers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(([KMGT])(i?)(B?))?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GiB, 80GB, 512MiB)")
    number, unit, binary, suffix_b = float(m[1]), (m[3] or "").upper(), bool(m[4]), bool(m[5])
    if not unit:
        return int(number)
    base = 1024 if binary or not suffix_b else 1000  # "24G" means GiB, as nvidia-smi and torch print
    return int(number * base ** ("KMGT".index(unit) + 1))


# ------------------------------------------------------------------------------------------- the model


def _static(shape: ModelShape, o: _Options) -> dict[str, int]:
    """Weights, gradients and optimizer states on the device (and what offloading puts on the host)."""
    dt, world = DTYPE_BYTES[o.dtype], o.world_size
    base, lora = shape.base_params(), shape.lora_params(o.lora_rank, o.lora_targets)
    trainable = lora if o.lora_rank else base
    weights = base * dt + lora * DTYPE_BYTES[o.lora_dtype]
    gdt = DTYPE_BYTES[o.lora_dtype] if o.lora_rank else dt  # gradients come in the parameter's dtype
    mixed = gdt < 4
    host = 0
    sizes = dict(params=base + lora, trainable=trainable)
    if o.backend == "local":  # torch AdamW keeps its two moments in the parameter's dtype
        grad_accum = 4 * trainable if mixed else 0  # chunkwise_backward's float32 sums of 16-bit gradients
        return dict(
            weights=weights,
            grads=trainable * gdt,
            optimizer=2 * trainable * gdt,
            grad_accum=grad_accum,
            host=0,
            **sizes,
        )

    # ZeRO-3 partitions the weights and gathers what runs: a layer and the prefetched next one (or lm_head).
    if o.zero_stage == 3:
        working = (shape.layer_params() + max(shape.layer_params(), shape.vocab * shape.hidden)) * dt
        partition = math.ceil(weights / world)
        host += partition if o.offload_param else 0
        weights = working + (0 if o.offload_param else partition)
    # Gradients in the parameter dtype: whole on every rank for stages 0/1; stages 2/3 keep their partition
    # and reduce through one bucket. With optimizer offload the partition (fp32) lives on the host.
    bucket = min(trainable, REDUCE_BUCKET) * gdt
    if o.zero_stage <= 1:
        grads = trainable * gdt
    else:
        grads = bucket + (0 if o.offload_optimizer else math.ceil(trainable * gdt / world))
    # Adam: two float32 moments, plus a float32 master copy when the parameters are 16-bit.
    opt = (12 if mixed else 8) * trainable
    opt = math.ceil(opt / world) if o.zero_stage >= 1 else opt
    if o.offload_optimizer:
        host += opt + math.ceil(4 * trainable / world)  # + the fp32 gradient partition
        opt = 0
    return dict(weights=weights, grads=grads, optimizer=opt, grad_accum=0, host=host, **sizes)


def _activations(shape: ModelShape, o: _Options, seq_len: int) -> tuple[int, int, int]:
    """Bytes autograd keeps for backward of the last chunk (C tokens, keys over the whole sequence):
    (all layers and the head, one layer's MLP side that backward frees before its attention, the head's share).

    Counted per decoder layer, following what transformers' Llama layer and torch's autograd save:
      RMSNorm    its input in float32 (x.to(float32) is what pow/mul keep) and the float32 1/rms; with a
                 trainable norm weight also the normalised tensor (model dtype)
      linears    the input of every linear whose weight trains, or of a LoRA adapter (a copy per adapter
                 when the adapter dtype differs from the model's); LoRA's A output (rank r) for its B
      attention  RoPE'd queries, the output and log-sum-exp; K/V are views of the cache, except that GQA's
                 repeat_kv copies them per query head; sdpa's additive mask (model dtype, [C, L]) is one
                 tensor for all layers; eager keeps the softmax in float32 (+ its model-dtype copy)
      MLP        gate and up outputs, silu(gate); the product too when down_proj's input is needed
    """
    h, i, q = shape.hidden, shape.intermediate, shape.q_width
    dt, ldt, c, L, b = DTYPE_BYTES[o.dtype], DTYPE_BYTES[o.lora_dtype], o.chunk_size, seq_len, o.batch
    full = o.lora_rank == 0
    lora = set(o.lora_targets)

    def input_kept(consumers) -> int:
        """Bytes per token kept of the tensor feeding these linears (full: their weight gradients need it;
        LoRA: adapter A needs it, shared when the adapter dtype is the model's, else one cast per adapter)."""
        width = shape.linear_dims()[consumers[0]][0]
        if full:
            return width * dt
        with_lora = [t for t in consumers if t in lora]
        return width * (dt if ldt == dt else ldt * len(with_lora)) if with_lora else 0

    norm_x = 4 * h + 4  # RMSNorm keeps its input cast to float32 (even from float64) and 1/rms
    normed = dt * h if full else 0  # kept for the (trainable) norm weight's gradient
    lora_mid = sum(o.lora_rank * ldt for _ in o.lora_targets)

    attn_side = norm_x + normed + input_kept(("q_proj", "k_proj", "v_proj"))
    attn_side += dt * q  # RoPE'd queries
    if o.attn == "eager":  # the output is a transpose(...).contiguous() copy, kept only for o_proj
        attn_side += input_kept(("o_proj",))
    else:  # fused kernels keep their output (= o_proj's input) and the log-sum-exp
        attn_side += dt * q + 4 * shape.heads
    if o.attn != "eager" and not full and "o_proj" in lora and ldt != dt:
        attn_side += ldt * q  # the adapter's own cast of o_proj's input
    attn_side += lora_mid
    mlp_side = norm_x + normed + input_kept(("gate_proj", "up_proj"))
    mlp_side += 3 * dt * i + input_kept(("down_proj",))  # gate, up, silu(gate); gate*up for down_proj

    # Terms growing with the sequence: per layer, for keys over the whole sequence.
    gqa_copies = 2 * q * dt if (o.repeat_kv and shape.heads != shape.kv_heads) else 0
    shared_per_key = c * dt if o.attn == "sdpa" else 0  # the additive mask row per query, all layers
    if o.attn == "sdpa":
        per_key = gqa_copies
    elif o.attn == "eager":
        per_key = gqa_copies + c * shape.heads * (4 + (dt if dt != 4 else 0))
    else:  # flash attention builds no mask
        per_key = gqa_copies

    layer_tokens = attn_side + mlp_side
    first_layer_saving = 0 if full else norm_x  # LoRA: the embedding output needs no gradient
    head = norm_x + normed + (dt * h if full else 0)  # final norm, lm_head's input
    rope = 2 * shape.head_dim * dt  # cos and sin of the chunk's positions
    acts = b * (
        c * (shape.layers * layer_tokens - first_layer_saving + head + rope)
        + (shape.layers * per_key + shared_per_key) * L
    )
    return acts, b * c * mlp_side, b * c * head


def _phases(
    shape: ModelShape, o: _Options, seq_len: int, acts: int, top_mlp: int, head: int
) -> dict[str, int]:
    """Live bytes at each candidate peak of backward (activations included), for the last chunk."""
    dt, c, b, L, v = DTYPE_BYTES[o.dtype], o.chunk_size, o.batch, seq_len, shape.vocab
    xf = max(dt, 4)
    full = o.lora_rank == 0
    phases = {}
    # Cross-entropy in float32: log-softmax output, NLL gradient, log-softmax gradient.
    phases["ce"] = acts + 3 * b * c * v * xf
    # lm_head backward: the logits' gradient cast back to the model dtype, then (full FT) the weight gradient.
    cast = b * c * v * (xf + dt) if dt != xf else b * c * v * xf
    head_grad = b * c * v * dt + b * c * shape.hidden * dt + (v * shape.hidden * dt if full else 0)
    phases["lm_head"] = acts + max(cast, head_grad)
    # The top layer's attention backward (its MLP side and the head already freed): gradients of Q and of the
    # (repeated) K/V over prefix + chunk in model dtype, their per-KV-head sums, and the relay in float32.
    heads = shape.heads if o.repeat_kv else shape.kv_heads
    per_head_kv = b * heads * shape.head_dim * L * dt  # K or V over the whole sequence, as attention sees it
    q_grad = b * c * shape.q_width * dt
    kv_grad = 2 * per_head_kv + 2 * q_grad
    if heads != shape.kv_heads:
        kv_grad += 2 * b * shape.kv_width * L * dt
    kv_grad += 2 * b * c * shape.kv_width * (4 + dt)
    if o.attn == "eager":
        # [C, L] per head: softmax backward holds the probabilities' and the scores' gradients (float32);
        # later Q K^T's backward holds the scores' gradient with Q's and K's.
        scores = b * shape.heads * c * L
        kv_grad = max((4 + xf) * scores, dt * scores + per_head_kv + q_grad)
    if o.offload_kv:
        # K/V come back from the host for backward: this layer's (when attention saved the fetched copy
        # itself, i.e. without repeat_kv) and, on CUDA, the next layer's prefetched; on CUDA the float32
        # deposit on the host-resident gradient is staged on the device, one of K/V at a time.
        layer_kv = b * shape.kv_width * L
        cuda = o.device == "cuda"
        kv_grad += 0 if heads != shape.kv_heads else 2 * layer_kv * dt * (2 if cuda else 1)
        kv_grad += 4 * layer_kv if cuda else 0
    phases["attention"] = acts - top_mlp - head + kv_grad
    if full:  # the top layer's MLP backward: a weight gradient [h, I] with the input's and output's gradients
        h, i = shape.hidden, shape.intermediate
        phases["weight_grad"] = acts - head + dt * (h * i + b * c * (h + i))
    return phases


def _evaluate(shape: ModelShape, o: _Options, seq_len: int) -> tuple[dict, int, int, int, dict[str, int]]:
    """static parts, K/V, K/V grads, activations, and the live bytes (beyond those) at each candidate peak."""
    s = _static(shape, o)
    kv, kv_grads = (0, 0) if o.offload_kv else _kv(shape, o, seq_len)
    acts, top_mlp, head = _activations(shape, o, seq_len)
    phases = _phases(shape, o, seq_len, acts, top_mlp, head)
    if s["grad_accum"]:  # local backend, 16-bit: the float32 sums are cast back into .grad at the end
        phases["finalize"] = s["grads"]
    return s, kv, kv_grads, acts, phases


def _phase_totals(shape: ModelShape, o: _Options, seq_len: int) -> dict[str, int]:
    s, kv, kv_grads, _, phases = _evaluate(shape, o, seq_len)
    persistent = s["weights"] + s["grads"] + s["optimizer"] + s["grad_accum"] + kv + kv_grads
    return {name: persistent + value for name, value in phases.items()}


def _host_total(shape: ModelShape, o: _Options, seq_len: int) -> int:
    return _static(shape, o)["host"] + (sum(_kv(shape, o, seq_len)) if o.offload_kv else 0)


def _kv(shape: ModelShape, o: _Options, seq_len: int) -> tuple[int, int]:
    """K/V checkpoints (model dtype) and their float32 gradients over the whole sequence."""
    elems = 2 * shape.layers * shape.kv_width * seq_len * o.batch
    return elems * DTYPE_BYTES[o.dtype], elems * 4


# ------------------------------------------------------------------------------------------------- CLI


def load_model_config(model: str | None = None, hf_config: str | None = None) -> tuple[str, dict]:
    """(a name for it, its config fields) from a local HF model directory, a config JSON file, an inline
    JSON object or a preset name. Nothing is downloaded."""
    if (model is None) == (hf_config is None):
        raise ValueError("give exactly one of --model (a local model directory) and --hf-config")
    if model is not None:
        path = Path(model) / "config.json"
        if not path.is_file():
            raise ValueError(f"--model {model}: no config.json there (a local Hugging Face model directory)")
        return model, json.loads(path.read_text())
    if hf_config in PRESETS:
        return hf_config, dict(PRESETS[hf_config])
    if hf_config.lstrip().startswith("{"):
        return "inline config", json.loads(hf_config)
    path = Path(hf_config)
    if not path.is_file():
        raise ValueError(
            f"--hf-config {hf_config!r}: neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    return hf_config, json.loads(path.read_text())


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _tokens(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def _describe(name: str, shape: ModelShape, kw: dict, b0: Breakdown) -> list[str]:
    o = _Options(chunk_size=1, **kw)
    attn = o.attn + (
        ", K/V repeated per query head (GQA)" if o.repeat_kv and shape.heads != shape.kv_heads else ""
    )
    if o.lora_rank:
        what = f"LoRA r={o.lora_rank} on {','.join(o.lora_targets)} ({b0.trainable / 1e6:.2f}M trainable, {o.lora_dtype})"
    else:
        what = f"full fine-tuning ({b0.trainable / 1e9:.2f}B trainable)"
    if o.backend == "local":
        zero = "none (local backend: one process, torch AdamW)"
    else:
        off = [n for n, on in (("optimizer", o.offload_optimizer), ("parameters", o.offload_param)) if on]
        zero = f"stage {o.zero_stage}, world size {o.world_size}" + (
            f", {' and '.join(off)} offloaded to host" if off else ""
        )
    return [
        f"model      {name}: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / {shape.kv_heads} KV "
        f"heads (head_dim {shape.head_dim}), MLP {shape.intermediate}, vocab {shape.vocab}; {b0.params / 1e9:.2f}B params",
        f"training   {what}; {o.dtype}, batch {o.batch}, attention {attn}"
        + ("; K/V offloaded to host" if o.offload_kv else ""),
        f"ZeRO       {zero}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m engine.plan",
        description="Predict the peak device memory of chunk-wise (SeCO/SpaCO) training and the longest sequence "
        "that fits. Every size is per data-parallel rank. See the module docstring for what is not modelled.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model directory (its config.json is read)")
    src.add_argument(
        "--hf-config", help=f"config JSON file, inline JSON object, or a preset: {', '.join(PRESETS)}"
    )
    p.add_argument("--device-memory", help="accelerator memory, e.g. 24GiB, 80GB (omit: no longest sequence)")
    p.add_argument("--host-memory", help="host memory for offloaded state, e.g. 256GiB (default: unbounded)")
    p.add_argument(
        "--reserve",
        default="1GiB",
        help="memory outside the model's tensors: CUDA context, cuBLAS/NCCL workspaces (default 1GiB)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.10,
        help="fraction of the rest kept free for allocator caching and fragmentation (default 0.10)",
    )
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument(
        "--world-size", type=int, default=1, help="data-parallel ranks (ZeRO partitions over them)"
    )
    p.add_argument(
        "--offload-optimizer", action="store_true", help="Adam states (and fp32 grads) in host memory"
    )
    p.add_argument("--offload-param", action="store_true", help="ZeRO-3 parameter partitions in host memory")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning (default)")
    p.add_argument("--lora-targets", default=",".join(LORA_DEFAULT_TARGETS))
    p.add_argument("--lora-dtype", default=None, help="adapter dtype (default: the model dtype)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES))
    p.add_argument("--chunk-sizes", default="256,512,1024")
    p.add_argument("--seq-lens", default="4K,8K,16K,32K", help="lengths to show the peak at (K = 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attn", default="sdpa", choices=ATTN)
    p.add_argument(
        "--repeat-kv",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether attention copies K/V per query head for GQA (default: sdpa/eager yes, flash no)",
    )
    p.add_argument(
        "--offload-kv",
        action="store_true",
        help="K/V checkpoints and gradients in host memory (chunkwise offload_kv)",
    )
    p.add_argument("--backend", default="deepspeed", choices=BACKENDS)
    p.add_argument("--device", default="cuda", choices=DEVICES, help="cpu: the engine's CPU code paths")
    a = p.parse_args(argv)

    try:
        name, cfg = load_model_config(a.model, a.hf_config)
        shape = ModelShape.from_config(cfg)
        chunks = [int(c) for c in a.chunk_sizes.split(",") if c.strip()]
        lengths = [_tokens(s) for s in a.seq_lens.split(",") if s.strip()]
        kw = dict(dtype=a.dtype, batch=a.batch, zero_stage=a.zero_stage, world_size=a.world_size,
                  offload_optimizer=a.offload_optimizer, offload_param=a.offload_param, lora_rank=a.lora_rank,
                  lora_targets=tuple(t.strip() for t in a.lora_targets.split(",") if t.strip()),
                  lora_dtype=a.lora_dtype, attn=a.attn, repeat_kv=a.repeat_kv, backend=a.backend,
                  offload_kv=a.offload_kv, device=a.device)  # fmt: skip
        first = plan(shape, chunk_size=chunks[0], seq_len=lengths[0], **kw)
        budget = usable_memory(a.device_memory, a.reserve, a.margin) if a.device_memory else None
        host = parse_bytes(a.host_memory) if a.host_memory else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    lines = ["# python -m engine.plan " + " ".join(sys.argv[1:] if argv is None else argv), ""]
    lines += _describe(name, shape, kw, first)
    if budget is not None:
        lines.append(
            f"device     {a.device_memory} - reserve {a.reserve}, margin {a.margin:.0%} -> {_gib(budget)} GiB "
            "for the step's tensors" + (f"; host {a.host_memory}" if host else "")
        )
    lines.append("all sizes in GiB, per rank; peak = the largest moment of the last chunk's backward")
    for chunk in chunks:
        lines += ["", *_chunk_table(shape, kw, chunk, lengths, budget, host)]
    print("\n".join(lines))
    return 0


def _chunk_table(shape: ModelShape, kw: dict, chunk: int, lengths, budget, host) -> list[str]:
    """One chunk size: the breakdown at the given lengths and at the longest that fits (if a budget)."""
    longest = None
    if budget is not None:
        longest = longest_sequence(
            shape, device_memory=budget, reserve=0, margin=0.0, host_memory=host, chunk_size=chunk, **kw
        )
    cols = [*lengths, longest] if longest else list(lengths)
    plans = [plan(shape, chunk_size=chunk, seq_len=n, **kw) for n in cols]
    head = [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in cols]
    if longest:
        head[-1] += " (max)"

    def row(label: str, cells) -> str:
        return f"  {label:<20}" + "".join(f"{cell:>13}" for cell in cells)

    lines = [f"chunk {chunk:<16}" + "".join(f"{h:>13}" for h in head)]
    for comp in Breakdown.COMPONENTS:
        lines.append(row(comp, [_gib(getattr(b, comp)) for b in plans]))
        if comp == "activations":
            lines.append(row("  growing with L", [_gib(b.seq_activations) for b in plans]))
    lines.append(row("total", [_gib(b.total) for b in plans]))
    lines.append(row("peak phase", [b.peak_phase for b in plans]))
    lines.append(row("host (offloaded)", [_gib(b.host) for b in plans]))
    if budget is None:
        return lines
    fits = [b.total <= budget and (host is None or b.host <= host) for b in plans]
    lines.append(row("fits", ["yes" if f else "no" for f in fits]))
    if longest:
        lines.append(f"  longest sequence that fits: {longest} tokens ({longest // chunk} chunks of {chunk})")
    else:
        one = plan(shape, chunk_size=chunk, seq_len=chunk, **kw)
        lines.append(
            f"  does not fit: one chunk of {chunk} tokens alone needs {_gib(one.total)} GiB"
            + (f" (host {_gib(one.host)} GiB)" if host else "")
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
