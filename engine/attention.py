"""The attention a chunk runs with: mask-free lower-right causal GQA, registered once with transformers.

A chunk's queries (positions s..e-1) attend to the cached prefix (0..s-1) plus the chunk itself. transformers'
`sdpa` builds a [chunk x L] mask for that in every forward and, on CPU with a mask, repeats every K/V head
per query head: both grow with the sequence and sit in what attention saves for backward. Here:

* Full-attention layers get no mask at all. The causal pattern of a chunk is the bottom-right aligned one
  (query i sees keys 0 .. s+i). Padding needs no mask either: the engine only accepts right padding, so every
  valid query's keys (all at earlier positions) are valid, and a padded query, which may see padded keys,
  carries no loss and is seen by no valid query, so its (finite) output cannot reach the loss or a gradient.
  Alignment matters: top-left alignment would hide the chunk's own earlier tokens and expose nothing wrong
  in shapes; `tests/test_attention.py` compares against explicit masks so that a wrong alignment fails.
* GQA heads are never repeated: torch's kernels take grouped K/V (`enable_gqa`, or natively on CPU).
* On CPU (no dropout) the chunk is split into the prefix block (no mask) and its diagonal block (causal,
  square, so top-left = bottom-right) and the two are merged by their log-sum-exp, with torch's own CPU flash
  kernel; backward walks the prefix in key blocks of one chunk, so no temporary grows with L beyond the K/V
  gradient that attention must hand back. Elsewhere SDPA gets `torch.nn.attention.bias.causal_lower_right`,
  which dispatches to torch's flash or memory-efficient kernel on CUDA.
* Sliding windows and every other pattern keep the model's own mask (transformers' sdpa mask, handed over
  as one additive float tensor shared by all layers, so SDPA does not make a float copy per layer).

Registration happens once, at import, under `ATTENTION` in transformers' `AttentionInterface` and
`AttentionMaskInterface`; `chunk_attention(model)` selects it on the model's own config for one step and
restores the previous name afterwards. Nothing process-wide changes per step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

ATTENTION = "seco_sdpa"  # the name models select (config._attn_implementation) during a chunk-wise step
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def chunk_mask_interface(
    *args, mask_function=causal_mask_function, allow_is_causal_skip: bool = True, **kwargs
):
    """Mask interface: no mask for the plain causal pattern (see the module docstring for why padding needs
    none either); any other pattern (sliding window, chunked, packed, bidirectional, or-/and-masks) is
    transformers' own sdpa mask as one additive float tensor."""
    if mask_function is causal_mask_function and allow_is_causal_skip:
        return None
    dtype = kwargs.pop("dtype", torch.float32)
    mask = sdpa_mask(*args, mask_function=mask_function, allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    # 0 where attended, dtype-min elsewhere: softmax turns dtype-min into exactly 0, as the boolean mask.
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def chunk_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention interface (same contract as transformers' sdpa_attention_forward): [b, q, h, d], None."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{ATTENTION}: attention softcapping is not supported; use attn_implementation 'eager'"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("position_bias") is not None or not causal:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if attention_mask is not None:  # the model's own pattern (sliding window, ...)
        out = masked_attention(query, key, value, attention_mask, dropout, scaling, groups)
    else:
        out = lower_right_causal(query, key, value, dropout=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def lower_right_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + bottom-right causal) v for q [b, h, n, d] and grouped k, v [b, hk, L, d]."""
    n, total = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if n == total:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
        )
    if q.device.type == "cpu" and dropout == 0.0 and _CPU_FLASH is not None and k.shape[-1] == v.shape[-1]:
        return _PrefixPlusDiagonal.apply(q, k, v, scale)
    # With dropout this materialises a boolean [n x L] mask on CPU (the math kernel draws the same dropout
    # masks as transformers' sdpa); on CUDA it dispatches to torch's flash / efficient kernel.
    bias = causal_lower_right(n, total)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale, enable_gqa=gqa
    )


class _PrefixPlusDiagonal(torch.autograd.Function):
    """CPU: prefix block (no mask) and diagonal block (causal) merged by log-sum-exp, torch's flash kernel.

    Backward uses the identity flash attention itself relies on: given the *merged* output O and log-sum-exp,
    each key block's gradient is that block's attention backward (dS = P * (dP - rowsum(dO * O))), and the
    query gradient is their sum. The prefix is walked in key blocks of the chunk's length, written straight
    into the K/V gradient that is returned, so no temporary grows with the prefix."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        start = k.shape[-2] - q.shape[-2]
        o1, lse1 = _CPU_FLASH(q, k[..., :start, :], v[..., :start, :], 0.0, False, scale=scale)
        o2, lse2 = _CPU_FLASH(q, k[..., start:, :], v[..., start:, :], 0.0, True, scale=scale)
        lse = torch.logaddexp(lse1, lse2)  # float32 for 16-bit inputs: merge there, round once
        acc = torch.promote_types(o1.dtype, lse.dtype)
        w1 = torch.exp(lse1 - lse).unsqueeze(-1)
        w2 = torch.exp(lse2 - lse).unsqueeze(-1)
        out = torch.addcmul(o1.to(acc) * w1, o2.to(acc), w2).to(o1.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        n, total = q.shape[-2], k.shape[-2]
        start = total - n
        grad_out = grad_out.contiguous()
        back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dq, dk_, dv_ = back(
            grad_out, q, k[..., start:, :], v[..., start:, :], out, lse, 0.0, True, scale=ctx.scale
        )
        dk[..., start:, :].copy_(dk_)
        dv[..., start:, :].copy_(dv_)
        block = max(n, 1)
        for a in range(0, start, block):
            b = min(a + block, start)
            dq_, dk_, dv_ = back(
                grad_out, q, k[..., a:b, :], v[..., a:b, :], out, lse, 0.0, False, scale=ctx.scale
            )
            dq.add_(dq_)
            dk[..., a:b, :].copy_(dk_)
            dv[..., a:b, :].copy_(dv_)
        return dq, dk, dv, None


def masked_attention(q, k, v, mask, dropout, scale, groups):
    """SDPA with the model's own (additive) mask. On CPU torch takes grouped K/V together with a mask; on
    CUDA `enable_gqa` with a mask would select the math kernel, so K/V are repeated there, as transformers
    does (use flash_attention_2 for sliding windows on a GPU)."""
    gqa = groups > 1 and q.device.type == "cpu"
    if groups > 1 and not gqa:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa
    )


AttentionInterface.register(ATTENTION, chunk_attention_forward)
AttentionMaskInterface.register(ATTENTION, chunk_mask_interface)


@contextlib.contextmanager
def chunk_attention(config):
    """Select `ATTENTION` on a model's (text) config for the duration of a chunk-wise step, if the model
    runs transformers' `sdpa`; eager, flash-attn and user implementations are left as they are."""
    previous = config._attn_implementation
    if previous != "sdpa":
        yield previous
        return
    config._attn_implementation = ATTENTION
    try:
        yield ATTENTION
    finally:
        config._attn_implementation = previous
