"""The memory model: the peak device memory of one chunk-wise step, by component, and the longest sequence.

What is modelled (per data-parallel rank, bytes on the accelerator), for the decoder of engine/plan/shape.py
trained by engine/chunkwise.py:

    weights, grads, optimizer   as the ZeRO stage / world size / offload flags place them (Adam: two float32
                      moments, plus float32 master weights for 16-bit models; one reduce bucket for ZeRO-2/3)
    grad_accum        chunkwise_backward's float32 sums of 16-bit gradients (backend "local" only)
    kv                K/V checkpoints of the attention layers, 2 * kv_heads * head_dim * L * batch each, in
                      the model dtype; hybrids add each linear layer's state at every chunk boundary
    kv_grads          the same K/V shape in kv_grad_dtype (bfloat16 for bf16 models by default), and one
                      boundary's state gradient per linear layer (with offload_kv in host memory, `kv_host`;
                      "auto": only what does not fit on the device)
    activations       what autograd saves for backward of ONE chunk of C tokens, the last one (its keys span
                      the whole sequence): per layer the RMSNorm inputs (float32), the inputs of trainable
                      linears and LoRA adapters, RoPE'd queries, the attention output, the MLP (or top-k
                      experts') intermediates. Growing with L only with eager attention: its K/V copies per
                      query head (GQA) and its probabilities; the engine's sdpa (engine/attention.py) and
                      flash-attn get no mask and grouped heads. checkpoint_layers: each layer's input only,
                      plus one layer recomputed during its backward
    transient         the largest of what backward allocates on top of that: the chunk's cross-entropy
                      (float32 [C, vocab] x 3; fused_loss: one slice's float32 [loss_slice, vocab], in
                      place), the lm_head backward,
                      the top layer's attention backward (gradients over prefix + chunk K/V; with offload_kv
                      its K/V fetched back from the host, the next layer's prefetched, the deposit staged),
                      the top layer's MLP backward (full fine-tuning)

The last chunk is taken as a full chunk (an upper bound when C does not divide L). Checked on CPU against
engine.memory.MemoryTracker (tests/test_plan.py). Not modelled, hence `reserve` and `margin`: the CUDA
context, cuBLAS/NCCL workspaces, allocator caching and fragmentation, kernels' internal scratch (flash /
memory-efficient attention workspaces), DeepSpeed buffers beyond one reduce bucket, pinned host buffers. On
CUDA the attention kernels differ from CPU's: the CUDA numbers are a prediction, not a measurement. Hybrid
layers' saved widths and MoE routing buffers are estimated from their shapes (not yet measured).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from engine.plan.setup import DTYPE_BYTES, REDUCE_BUCKET, Setup, parse_bytes
from engine.plan.shape import ModelShape


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


def evaluate(
    shape: ModelShape, o: Setup, seq_len: int, device_budget: int | None = None, static_shape=None
) -> Breakdown:
    """The Breakdown at seq_len; offload_kv "auto" keeps on the device what fits in device_budget.
    `static_shape`: the shape whose parameters are counted, when `shape` is one rank's view of it."""
    if o.sequence > 1:
        return _sequence_parallel(shape, o, seq_len, device_budget)
    if o.offload_kv == "auto":
        if device_budget is None:
            raise ValueError("offload_kv 'auto' needs the device memory (device_memory=...)")
        on, off = (
            evaluate(shape, o.replace(offload_kv=True), seq_len, static_shape=static_shape),
            evaluate(shape, o.replace(offload_kv=False), seq_len, static_shape=static_shape),
        )
        room = (
            device_budget - on.total
            if o.kv_device_budget is None
            else min(o.kv_device_budget, device_budget - on.total)
        )
        kept = max(0, min(on.kv_host, room))  # what fits beside the offloaded plan
        share = kept / on.kv_host if on.kv_host else 0.0
        on.kv, on.kv_grads = int(off.kv * share), kept - int(off.kv * share)
        on.kv_host -= kept
        on.host -= kept
        return on
    s = _static(static_shape or shape, o)
    kv, kv_grads = kv_bytes(shape, o, seq_len)
    acts, parts = _activations(shape, o, seq_len)
    phases = _phases(shape, o, seq_len, acts, parts)
    if s["grad_accum"]:  # local backend, 16-bit: the float32 sums are cast back into .grad at the end
        phases["finalize"] = s["grads"]
    phase = max(phases, key=phases.get)
    kv_host = kv + kv_grads if o.offload_kv else 0
    if o.offload_kv:
        kv = kv_grads = 0
    return Breakdown(
        weights=s["weights"], grads=s["grads"], optimizer=s["optimizer"], grad_accum=s["grad_accum"],
        kv=kv, kv_grads=kv_grads, activations=acts, transient=phases[phase] - acts, peak_phase=phase,
        seq_activations=acts - _activations(shape, o, 0)[0], kv_host=kv_host, host=s["host"] + kv_host,
        params=s["params"], trainable=s["trainable"],
    )  # fmt: skip


# Hybrid families whose recurrent mixers a sequence group splits by heads (engine/sharded_mixers.py's classes;
# tests/test_sequence_parallel.py checks the two lists agree); others' mixers run gathered (replicated).
SPLIT_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "nemotron_h")


def mixers_split(shape: ModelShape, p: int) -> bool:
    """Whether a sequence group of p splits the hybrid's recurrent mixers by heads."""
    return bool(shape.linear_layers) and shape.family in SPLIT_FAMILIES and shape.linear_split % p == 0


def rank_shape(shape: ModelShape, p: int) -> ModelShape:
    """What one rank of a sequence group of p holds of each attention layer's K/V: kv_heads / p heads, or
    one (replicated) when there are fewer K/V heads than ranks; and of each recurrent layer's boundary states:
    1/p where the mixers are split by heads, else all of them (replicated)."""
    split = mixers_split(shape, p)
    return dataclasses.replace(
        shape,
        kv_heads=max(1, shape.kv_heads // p),
        rec_state=shape.rec_state // p if split else shape.rec_state,
        conv_state=shape.conv_state // p if split else shape.conv_state,
    )


def _sequence_parallel(shape: ModelShape, o: Setup, seq_len: int, device_budget: int | None) -> Breakdown:
    """One rank of a sequence group of P (engine/sequence_parallel.py). It holds C/P tokens of every chunk
    with all heads through norms, MLPs, the loss and what attention saves (C/P tokens x H heads = C tokens x
    H/P heads, in bytes), and the K/V (+ gradients) of its K/V heads over the whole sequence: the plan of a
    rank with chunks of C/P tokens and `rank_shape`'s K/V heads, with the whole model's parameters (ZeRO
    partitions over all world_size ranks). On top: o_proj's input, which the all-to-all back makes a tensor
    of its own (without sequence parallelism it is the attention kernel's saved output). Hybrids' recurrent
    mixers split by heads (`mixers_split`) save C/P tokens x all channels before the all-to-all and C tokens x
    1/P of them after (the plan of C/P tokens, in bytes), their boundary states 1/P; gathered mixers save C
    tokens and keep every state (replicated). Hybrid terms are estimates from shapes, not measured. Not
    modelled: the all-to-all buffers (one chunk's q, k, v or output in flight at a time), the mixers' gather."""
    p, c = o.sequence, o.chunk_size // o.sequence
    dt, ldt = DTYPE_BYTES[o.dtype], DTYPE_BYTES[o.lora_dtype]
    kept = dt if o.lora_rank == 0 else (ldt if "o_proj" in o.lora_targets else 0)
    layers = 1 if o.checkpoint_layers else shape.attn_layers  # checkpointed: only the recomputed layer's
    extra = o.batch * c * shape.q_width * kept * layers
    if not mixers_split(shape, p):  # gathered: the mixers run on the whole chunk on every rank
        mixers = (
            min(1, shape.linear_layers) if o.checkpoint_layers else shape.linear_layers
        )  # recomputed: one
        extra += o.batch * (o.chunk_size - c) * _linear_side(shape, o) * mixers
    room = None if device_budget is None else device_budget - extra  # what offload_kv "auto" may fill
    rank = o.replace(sequence=1, chunk_size=c, state_chunk=o.chunk_size)  # states at the real boundaries
    b = evaluate(rank_shape(shape, p), rank, seq_len, room, shape)
    b.activations += extra
    return b


def longest(
    shape: ModelShape,
    o: Setup,
    budget: int,
    host_memory: int | str | None = None,
    multiple_of: int | None = None,
) -> int:
    """The longest multiple of `multiple_of` (default: the chunk size) whose plan fits (0: not one chunk).
    Every term grows monotonically with L, so a bisection over multiples is exact."""
    step = multiple_of or o.chunk_size
    host = None if host_memory is None else parse_bytes(host_memory)

    def fits(n: int) -> bool:
        b = evaluate(shape, o, n * step, device_budget=budget)
        return b.total <= budget and (host is None or b.host <= host)

    if not fits(max(1, math.ceil(o.chunk_size / step))):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:  # nothing grows with L (a pure recurrent model with everything offloaded)
            return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step if lo * step >= o.chunk_size else 0


# ------------------------------------------------------------------------------------------- the terms


def _static(shape: ModelShape, o: Setup) -> dict[str, int]:
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
        return dict(weights=weights, grads=trainable * gdt, optimizer=2 * trainable * gdt, grad_accum=grad_accum,
                    host=0, **sizes)  # fmt: skip
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
    opt = (12 if mixed else 8) * trainable  # Adam: two float32 moments (+ float32 master weights if 16-bit)
    opt = math.ceil(opt / world) if o.zero_stage >= 1 else opt
    if o.offload_optimizer:
        host += opt + math.ceil(4 * trainable / world)  # + the fp32 gradient partition
        opt = 0
    return dict(weights=weights, grads=grads, optimizer=opt, grad_accum=0, host=host, **sizes)


def kv_bytes(shape: ModelShape, o: Setup, seq_len: int) -> tuple[int, int]:
    """Checkpoints (attention layers' K/V over the whole sequence in the model dtype; linear layers' state at
    each of the k - 1 inner chunk boundaries) and their gradients (K/V in kv_grad_dtype; one boundary's state
    per linear layer), as engine/kv_cache.py and engine/state_cache.py hold them."""
    elems = 2 * shape.attn_layers * shape.kv_width * seq_len * o.batch
    states = shape.linear_layers * shape.state_bytes(DTYPE_BYTES[o.dtype]) * o.batch
    state_grads = shape.linear_layers * 4 * (shape.rec_state + shape.conv_state) * o.batch if seq_len else 0
    # States are kept at every chunk boundary but the first (the first chunk starts from zero states).
    boundaries = max(0, math.ceil(seq_len / (o.state_chunk or o.chunk_size)) - 1)
    kv = elems * DTYPE_BYTES[o.dtype] + boundaries * states
    return kv, elems * DTYPE_BYTES[o.kv_grad_dtype] + state_grads


def _activations(shape: ModelShape, o: Setup, seq_len: int) -> tuple[int, dict[str, int]]:
    """Bytes autograd keeps for backward of the last chunk (C tokens, keys over the whole sequence), and the
    parts the phases need: one layer's MLP side (freed before its attention's backward), the head's share,
    the layer recomputed under checkpoint_layers.

    Counted per decoder layer, following what transformers' Llama layer and torch's autograd save:
      RMSNorm    its input in float32 (x.to(float32) is what pow/mul keep) and the float32 1/rms; with a
                 trainable norm weight also the normalised tensor (model dtype)
      linears    the input of every linear whose weight trains, or of a LoRA adapter (a copy per adapter
                 when the adapter dtype differs from the model's); LoRA's A output (rank r) for its B
      attention  RoPE'd queries, the output and log-sum-exp; K/V are views of the cache, except that eager's
                 repeat_kv copies them per query head; eager keeps the softmax in float32 (+ its model-dtype
                 copy)
      MLP        gate and up outputs, silu(gate); the product too when down_proj's input is needed; MoE:
                 the router's logits and softmax, and that per expert run (top-k) with the token's input
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
    if shape.experts:
        # router logits (+ float32 softmax); per expert run: gate, up, silu(gate) and the output (for the
        # routing weight's gradient), with trained experts also the token's input and gate*up
        mlp_side = norm_x + normed + shape.experts * (dt + 4)
        mlp_side += (
            shape.top_k * (3 * i + h + (i + h if full else 0)) * dt + 4 * shape.shared_intermediate * dt
        )
    else:
        mlp_side = norm_x + normed + input_kept(("gate_proj", "up_proj"))
        mlp_side += 3 * dt * i + input_kept(("down_proj",))  # gate, up, silu(gate); gate*up for down_proj
    linear_side = _linear_side(shape, o)

    # Terms growing with the sequence: per attention layer, for keys over the whole sequence (none for sdpa
    # and flash-attn, which get no mask and grouped K/V heads).
    gqa_copies = 2 * q * dt if (o.repeat_kv and shape.heads != shape.kv_heads) else 0
    per_key = gqa_copies + (c * shape.heads * (4 + (dt if dt != 4 else 0)) if o.attn == "eager" else 0)

    attn_layer = c * (attn_side + mlp_side) + per_key * L
    linear_layer = c * (linear_side + mlp_side)
    first_layer_saving = 0 if full else norm_x  # LoRA: the embedding output needs no gradient
    head = norm_x + normed + (dt * h if full else 0)  # final norm, lm_head's input
    rope = 2 * shape.head_dim * dt  # cos and sin of the chunk's positions
    fixed = c * (head + rope - first_layer_saving)
    if o.checkpoint_layers:  # each layer keeps its input; one layer's graph exists again during its backward
        recomputed = attn_layer if shape.attn_layers else linear_layer
        layers = shape.layers * c * h * dt + recomputed
    else:
        recomputed = 0
        layers = shape.attn_layers * attn_layer + shape.linear_layers * linear_layer
    acts = b * (layers + fixed)
    return acts, {"top_mlp": b * c * mlp_side, "head": b * c * head, "recomputed": b * recomputed}


def _linear_side(shape: ModelShape, o: Setup) -> int:
    """Bytes per token a linear (recurrent) mixer layer keeps: its norm's input and 1/rms, the normalised
    tensor when the norm trains, and what the mixer's graph saves (its input when its weights train)."""
    dt, h, full = DTYPE_BYTES[o.dtype], shape.hidden, o.lora_rank == 0
    return 4 * h + 4 + (dt * h if full else 0) + dt * (shape.linear_width + (h if full else 0))


def _phases(shape: ModelShape, o: Setup, seq_len: int, acts: int, parts: dict[str, int]) -> dict[str, int]:
    """Live bytes at each candidate peak of backward (activations included), for the last chunk."""
    dt, c, b, L, v = DTYPE_BYTES[o.dtype], o.chunk_size, o.batch, seq_len, shape.vocab
    xf = max(dt, 4)
    full = o.lora_rank == 0
    h = shape.hidden
    head_acts = acts - parts["recomputed"]  # a checkpointed layer is recomputed after the head's backward
    phases = {}
    if o.fused_loss:
        # engine/loss.py computes each slice's gradients inside the forward: the hidden states' gradient
        # (model dtype) and, when the head trains, a float32 accumulator of its weight's; per slice one
        # float32 buffer that holds the logits, then their softmax, then their gradient (in place), plus
        # the model-dtype logits it was cast from (and, for grad_h, the gradient cast back) when the model
        # computes below float32. Softcapping models (Gemma-2) take autograd's path instead: not modelled.
        # Backward scales the stored gradients in place.
        s = min(o.loss_slice, c)
        weight_grad = v * h * 4 if full else 0
        phases["ce"] = head_acts + b * c * h * dt + weight_grad + b * s * v * (xf + (dt if dt != xf else 0))
        phases["lm_head"] = head_acts + b * c * h * dt + weight_grad  # scaled in place, then accumulated
    else:
        # Cross-entropy in float32: log-softmax output, NLL gradient, log-softmax gradient.
        phases["ce"] = head_acts + 3 * b * c * v * xf
        # lm_head backward: the logits' gradient cast back to the model dtype, then (full FT) the weight's.
        cast = b * c * v * (xf + dt) if dt != xf else b * c * v * xf
        head_grad = b * c * v * dt + b * c * h * dt + (v * h * dt if full else 0)
        phases["lm_head"] = head_acts + max(cast, head_grad)
    if shape.attn_layers:
        phases["attention"] = acts - parts["top_mlp"] - parts["head"] + _attention_backward(shape, o, L)
    if full:  # the top layer's MLP backward: a weight gradient [h, I] with the input's and output's gradients
        i = shape.intermediate
        phases["weight_grad"] = acts - parts["head"] + dt * (h * i + b * c * (h + i))
    return phases


def _attention_backward(shape: ModelShape, o: Setup, L: int) -> int:
    """The top attention layer's backward: gradients of Q and of the (repeated) K/V over prefix + chunk in
    model dtype, their per-KV-head sums, and the relay in float32 (its MLP side and the head already freed)."""
    dt, c, b = DTYPE_BYTES[o.dtype], o.chunk_size, o.batch
    xf = max(dt, 4)
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
    return kv_grad
