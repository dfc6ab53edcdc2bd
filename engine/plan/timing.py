"""Predicted step time: FLOPs at a stated device throughput, host<->device traffic at a stated bandwidth.

Compute (multiply-adds x 2, per step, batch included):
    forward of a chunk   2 x (active weights per token) x tokens  (dense layers, the top-k experts, the
                         linear mixers' projections, lm_head when the chunk's loss is computed there)
                         + 4 x heads x head_dim x (keys seen) per query and attention layer (Q K^T and P V)
    backward             2x the forward's matmuls for full fine-tuning (input and weight gradients), 1x with
                         LoRA (input gradients; the adapters' are negligible); attention 2.5x its forward
    SeCO                 pass 1 forwards every chunk (lm_head only for chunks pass 2 does not revisit);
                         pass 2 forwards and back-propagates the drawn chunks (all of them for SeCO, q k
                         for SpaCO); checkpoint_layers adds one more forward of the decoder layers in pass 2
Traffic (bytes over the host link):
    offload_kv           pass 1 writes each chunk's K/V and reads the prefix back for every later chunk's
                         attention; pass 2 reads the prefix twice per chunk (forward, backward) and adds the
                         chunk's deposit into the host-resident K/V grads (read + write); "auto": only the
                         share that lives on the host
    offload_optimizer    gradients down, updated weights up, once per step
    offload_param        ZeRO-3: every forward and backward fetches the weights (3 passes per drawn chunk)
With CUDA streams the copies overlap compute: the step takes max(compute, traffic); both are printed.
This is a prediction from arithmetic, not a measurement: state the achieved (not peak) throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.plan.memory import evaluate, rank_shape
from engine.plan.setup import DTYPE_BYTES, Setup
from engine.plan.shape import ModelShape

DEFAULT_TFLOPS = 50.0  # achieved bf16 throughput of a 24 GB card (RTX 3090 / 4090 class) in training
DEFAULT_BANDWIDTH = "20GB"  # per second: pinned host memory over PCIe 4.0 x16


@dataclass
class StepTime:
    flops: float
    compute_s: float
    host_bytes: int  # over the host link, both directions
    transfer_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.transfer_s)


def step_time(
    shape: ModelShape,
    o: Setup,
    seq_len: int,
    *,
    tflops: float = DEFAULT_TFLOPS,
    bandwidth: float = 20e9,
    selected: int | None = None,
    device_budget: int | None = None,
) -> StepTime:
    """The step's predicted time; `selected` = chunks pass 2 revisits (default: all, SeCO).

    Sequence parallelism (o.sequence = P): each rank computes 1/P of every chunk (its tokens through the
    dense layers, its heads in attention) and moves 1/P of the K/V over the host link; the all-to-alls
    themselves (4 per attention layer and chunk forward, as many in backward, each of a chunk's q, k, v or
    output) are not modelled: a lower bound where the interconnect is slow."""
    if tflops <= 0 or bandwidth <= 0:
        raise ValueError("the stated throughput and bandwidth must be > 0")
    if o.sequence > 1:
        one = step_time(shape, o.replace(sequence=1), seq_len, tflops=tflops, bandwidth=bandwidth,
                        selected=selected, device_budget=device_budget)  # fmt: skip
        kv_share = rank_shape(shape, o.sequence).kv_heads / shape.kv_heads
        h = host_traffic(shape, o.replace(sequence=1), seq_len, selected or one_chunks(o, seq_len),
                         device_budget, kv_share)  # fmt: skip
        flops = one.flops / o.sequence
        return StepTime(
            flops=flops, compute_s=flops / (tflops * 1e12), host_bytes=h, transfer_s=h / bandwidth
        )
    c, b, L = o.chunk_size, o.batch, seq_len
    k = math.ceil(L / c)
    t = k if selected is None else selected
    full = o.lora_rank == 0
    per_token = 2 * (shape.base_params(active=True) - shape.vocab * shape.hidden * (1 if shape.tied else 2))
    head = 2 * shape.vocab * shape.hidden
    # attention over the whole sequence (sum over chunks of queries x keys seen, causal: L^2 / 2)
    attn = 4 * shape.q_width * shape.attn_layers * L * L / 2
    fwd_layers = b * (per_token * L + attn)
    pass1 = fwd_layers + b * head * (k - t) * c
    frac = t / k  # pass 2 recomputes t of k chunks (their attention cost taken as an average chunk's)
    fwd2 = frac * fwd_layers + b * head * t * c
    bwd2 = (
        frac * b * ((2 if full else 1) * per_token * L + 2.5 * attn) + (2 if full else 1) * b * head * t * c
    )
    ckpt = frac * fwd_layers if o.checkpoint_layers else 0.0
    flops = pass1 + fwd2 + bwd2 + ckpt
    return StepTime(
        flops=flops,
        compute_s=flops / (tflops * 1e12),
        host_bytes=(h := host_traffic(shape, o, seq_len, t, device_budget)),
        transfer_s=h / bandwidth,
    )


def one_chunks(o: Setup, seq_len: int) -> int:
    return math.ceil(seq_len / o.chunk_size)


def host_traffic(
    shape: ModelShape, o: Setup, seq_len: int, selected: int, device_budget: int | None, kv_share: float = 1.0
) -> int:
    """Bytes over the host link per step; `kv_share`: the part of the K/V one rank holds."""
    c, L = o.chunk_size, seq_len
    k = math.ceil(L / c)
    dt, gdt = DTYPE_BYTES[o.dtype], DTYPE_BYTES[o.kv_grad_dtype]
    traffic = 0.0
    if o.offload_kv:
        share = 1.0
        if o.offload_kv == "auto":
            b = evaluate(shape, o, seq_len, device_budget=device_budget)
            share = b.kv_host / max(1, b.kv_host + b.kv + b.kv_grads)
        per_token = 2 * shape.attn_layers * shape.kv_width * o.batch  # K/V elements per token
        prefix = c * k * (k - 1) / 2  # sum over chunks of the tokens before them
        traffic += (
            kv_share * share * per_token * (dt * (L + prefix) + selected / k * prefix * (2 * dt + 2 * gdt))
        )
    static = evaluate(shape, o.replace(offload_kv=False), seq_len)
    if o.offload_optimizer:
        gbytes = DTYPE_BYTES[o.lora_dtype] if o.lora_rank else dt
        traffic += static.trainable * (gbytes + dt) / o.world_size
    if o.offload_param:
        traffic += (k + 2 * selected) * static.params * dt / o.world_size
    return int(traffic)
