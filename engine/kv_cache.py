"""The KV cache as a checkpoint along the sequence, plugged into transformers' own Cache interface.

One `ChunkKVCache` lives for one chunk-wise step. Each decoder layer gets a `ChunkKVLayer` holding four
preallocated buffers over the whole sequence: K and V exactly as attention consumes them (after RoPE, in the
model's dtype) and their gradients G_K, G_V (float32, the accumulator of many chunks' contributions).

The model calls `layer.update(k, v)` with the current chunk's K/V. We copy them into the buffers and hand
attention a *view* of the buffers covering prefix + chunk, so no per-layer concatenated copy of the prefix is
ever made. The view is produced by the autograd function `_AppendKV`, whose backward does the bookkeeping of
the paper's pass 2 in place:
  * the part of the incoming gradient that falls on the prefix is added into G (later chunks leave their
    gradient on earlier chunks' KV: "deposit");
  * the part on the chunk's own K/V receives, in addition, whatever later chunks already deposited on it,
    times the chunk's compensation factor ("relay"), and flows on into the chunk's graph and the parameters.
This equals backpropagating the scalar  s_c = w_c * (loss_c + <m_c, G_c>)  of DESIGN.md section 2, but
because it happens inside autograd it is exact under any uniform scaling of the loss (DeepSpeed's loss
scaling and 1/gradient_accumulation_steps included), which a surrogate dot product would scale twice.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _AppendKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, new: torch.Tensor, buf: torch.Tensor, grad_buf: torch.Tensor, start: int, relay: float):
        end = start + new.shape[-2]
        buf[..., start:end, :].copy_(new)
        ctx.grad_buf, ctx.start, ctx.end, ctx.relay = grad_buf, start, end, relay
        # A view, not a copy: attention reads prefix + chunk straight from the preallocated buffer.
        return buf[..., :end, :]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, start, end = ctx.grad_buf, ctx.start, ctx.end
        if start > 0:
            g[..., :start, :].add_(grad[..., :start, :])  # deposit on the prefix (fp32 accumulation)
        own = grad[..., start:end, :].float().add_(g[..., start:end, :], alpha=ctx.relay)  # relay G_c
        return own.to(grad.dtype), None, None, None, None


class ChunkKVLayer(CacheLayerMixin):
    """One decoder layer's K/V checkpoints and K/V gradients over the whole sequence."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: ChunkKVCache):
        super().__init__()
        self.cache = cache
        self.k_buf = self.v_buf = self.k_grad = self.v_grad = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        n, dev = self.cache.seq_len, key_states.device
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_buf = torch.empty(b, h, n, d, dtype=key_states.dtype, device=dev)
        self.v_buf = torch.empty(b, h, n, value_states.shape[-1], dtype=value_states.dtype, device=dev)
        if self.cache.needs_grad:
            self.k_grad = torch.zeros(b, h, n, d, dtype=torch.float32, device=dev)
            self.v_grad = torch.zeros(b, h, n, value_states.shape[-1], dtype=torch.float32, device=dev)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, relay = self.cache.offset, self.cache.relay
        assert start + key_states.shape[-2] <= self.cache.seq_len, "chunk runs past the planned sequence"
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            keys = _AppendKV.apply(key_states, self.k_buf, self.k_grad, start, relay)
            values = _AppendKV.apply(value_states, self.v_buf, self.v_grad, start, relay)
        else:  # pass 1: plain writes, no autograd node
            end = start + key_states.shape[-2]
            self.k_buf[..., start:end, :].copy_(key_states)
            self.v_buf[..., start:end, :].copy_(value_states)
            keys, values = self.k_buf[..., :end, :], self.v_buf[..., :end, :]
        self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Keys cover the whole prefix plus this chunk, starting at absolute position 0; the model then builds
        # the bottom-right aligned causal (+ padding, + sliding window) mask itself.
        return self.cache.offset + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.offset

    def get_max_length(self) -> int:
        return self.cache.seq_len

    def kv_bytes(self) -> int:
        bufs = (self.k_buf, self.v_buf, self.k_grad, self.v_grad)
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)


class ChunkKVCache(Cache):
    """transformers Cache whose prefix is the K/V of chunks already run; `offset` is where the chunk starts."""

    def __init__(self, num_layers: int, seq_len: int, needs_grad: bool = True):
        self.seq_len, self.needs_grad = seq_len, needs_grad
        self.offset, self.relay = 0, 1.0
        super().__init__(layers=[ChunkKVLayer(self) for _ in range(num_layers)])

    def begin_chunk(self, start: int, relay: float = 1.0) -> None:
        """Point the cache at the chunk starting at `start`; `relay` scales the KV gradient handed on to it."""
        self.offset, self.relay = start, relay

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)
