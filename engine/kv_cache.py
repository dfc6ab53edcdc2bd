"""The KV cache as a checkpoint along the sequence, plugged into transformers' own Cache interface.

One `ChunkKVCache` lives for one chunk-wise step. Each decoder layer gets a `ChunkKVLayer` holding four
preallocated buffers over the whole sequence: K and V exactly as attention consumes them (after RoPE, in the
model's dtype) and their gradients G_K, G_V, the accumulator of many chunks' contributions, in the type
promotion of the cache's `grad_dtype` (the run's kv_grad_dtype: bfloat16 by default) and the K/V's dtype: bf16
models follow kv_grad_dtype, float16 ones get float32, float32 and float64 ones keep theirs (the float64
exactness reference loses nothing).

The model calls `layer.update(k, v)` with the current chunk's K/V. We copy them into the buffers and hand
attention a *view* of the buffers covering prefix + chunk, so no per-layer concatenated copy of the prefix is
ever made. The view is produced by the autograd function `_AppendKV`, whose backward does the bookkeeping of
the paper's pass 2 in place:
  * the part of the incoming gradient that falls on the prefix is added into G (later chunks leave their
    gradient on earlier chunks' KV: "deposit");
  * the part on the chunk's own K/V receives, in addition, whatever later chunks already deposited on it,
    times the chunk's compensation factor ("relay"), and flows on into the chunk's graph and the parameters.
This equals backpropagating the scalar  s_c = w_c * (loss_c + <m_c, G_c>)  of docs/design.md section 2, but
because it happens inside autograd it is exact under any uniform scaling of the loss (DeepSpeed's loss
scaling and 1/gradient_accumulation_steps included), which a surrogate dot product would scale twice.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from engine.state_cache import ChunkStateLayer, OwnerRef, StateCacheMixin, build_layers
from engine.unwrap import base_model


class _AppendKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, new: torch.Tensor, layer: ChunkKVLayer, which: str, start: int, relay: float, lo: int):
        buf, grad_buf = layer.buffers(which)
        end = start + new.shape[-2]
        buf[..., start:end, :].copy_(new)
        ctx.grad_buf, ctx.start, ctx.end, ctx.relay, ctx.lo = grad_buf, start, end, relay, lo
        if layer.offload:  # a device copy of prefix + chunk, which backward re-fetches from the host
            return layer.cache.fetch(layer.idx, which, upto=start, total=end, tail=new)[..., lo:, :]
        # A view, not a copy: attention reads prefix + chunk straight from the preallocated buffer.
        return buf[..., lo:end, :]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, start, end, lo = ctx.grad_buf, ctx.start, ctx.end, ctx.lo
        own = grad[..., start - lo :, :]
        if g is None:  # no chunk reads an earlier chunk's K/V (packed rows cut at chunk starts)
            assert start == lo, "a prefix is read but no K/V gradient buffer was allocated"
            return own, None, None, None, None, None
        if start > lo:  # deposit on the prefix (in grad_dtype, never below the K/V's dtype)
            _add_into(g[..., lo:start, :], grad[..., : start - lo, :])
        if ctx.relay == 0.0:  # no later chunk reads this chunk's K/V (its documents end here): no relay
            return own, None, None, None, None, None
        relayed = g[..., start:end, :].to(grad.device, non_blocking=True)
        own = own.to(g.dtype).add_(relayed, alpha=ctx.relay)  # relay G_c, times this chunk's weight
        return own.to(grad.dtype), None, None, None, None, None


def _add_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.device == src.device:
        dst.add_(src)
        return
    # Host-resident accumulator: add on the device, copy back; same stream, so the next read sees it.
    tmp = dst.to(src.device, non_blocking=True).add_(src)
    dst.copy_(tmp, non_blocking=True)


class ChunkKVLayer(CacheLayerMixin):
    """One decoder layer's K/V checkpoints and K/V gradients over the whole sequence."""

    is_sliding = False
    is_compileable = False
    cache = OwnerRef()  # weakly: no reference cycle keeps the step's K/V alive after it

    def __init__(self, cache: ChunkKVCache, idx: int):
        super().__init__()
        self.cache, self.idx = cache, idx
        self.k_buf = self.v_buf = self.k_grad = self.v_grad = None
        self.offload = False  # this layer's K/V and grads in host memory (decided at allocation)
        self.written = -1  # the cache's chunk serial when this layer last wrote its K/V

    def buffers(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.k_buf, self.k_grad) if which == "k" else (self.v_buf, self.v_grad)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        n = self.cache.seq_len
        self.dtype, self.device = key_states.dtype, key_states.device
        kv_size = key_states.element_size() * b * h * n * (d + value_states.shape[-1])
        acc = torch.promote_types(key_states.dtype, self.cache.grad_dtype)
        grad_size = kv_size // key_states.element_size() * acc.itemsize if self.cache.needs_grad else 0
        host = self.offload = self.cache.place(kv_size + grad_size, key_states.device)
        # Pinned host memory makes the copies asynchronous; only worth it (and possible) next to a GPU.
        dev, pin = ("cpu", key_states.is_cuda) if host else (key_states.device, False)

        def alloc(dv, dtype, zero=False):
            t = torch.empty(b, h, n, dv, dtype=dtype, device=dev, pin_memory=pin)
            return t.zero_() if zero else t

        self.k_buf, self.v_buf = alloc(d, key_states.dtype), alloc(value_states.shape[-1], value_states.dtype)
        if self.cache.needs_grad:
            self.k_grad = alloc(d, acc, zero=True)
            self.v_grad = alloc(value_states.shape[-1], acc, zero=True)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, relay, lo = self.cache.offset, self.cache.relay, self.cache.kv_start
        self.written = self.cache.serial
        end = start + key_states.shape[-2]
        assert end <= self.cache.seq_len, "chunk runs past the planned sequence"
        out = []
        for which, new in (("k", key_states), ("v", value_states)):
            if torch.is_grad_enabled() and new.requires_grad:
                out.append(_AppendKV.apply(new, self, which, start, relay, lo))
                continue
            buf = self.buffers(which)[0]  # pass 1: plain writes, no autograd node
            buf[..., start:end, :].copy_(new)
            if self.offload:
                out.append(self.cache.fetch(self.idx, which, upto=start, total=end, tail=new)[..., lo:, :])
            else:
                out.append(buf[..., lo:end, :])
        # HF reads .keys for shapes only; never hold an offloaded device copy here.
        self.keys, self.values = self.k_buf[..., :end, :], self.v_buf[..., :end, :]
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Keys cover the prefix from `kv_start` (0 unless packed documents start later) plus this chunk; the
        # model then builds the bottom-right aligned causal (+ padding, + sliding window) mask itself.
        return self.cache.offset + query_length - self.cache.kv_start, self.cache.kv_start

    def get_seq_length(self) -> int:
        return self.cache.offset

    def get_max_length(self) -> int:
        return self.cache.seq_len

    def kv_bytes(self) -> int:
        bufs = (self.k_buf, self.v_buf, self.k_grad, self.v_grad)
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)


class ChunkKVCache(StateCacheMixin, Cache):
    """transformers Cache whose prefix is the K/V of chunks already run; `offset` is where the chunk starts.

    With `offload=True` the K/V checkpoints and their gradients live in (pinned) host memory. Attention gets
    a device copy of one layer's prefix at a time; the copies attention saves for backward are replaced by
    handles (saved-tensor hooks, `saved_kv_offloaded`) and fetched again, one layer ahead, during backward.
    Device memory then stays flat as the sequence grows; the sequence is bounded by host RAM.
    """

    def __init__(
        self,
        num_layers: int,
        seq_len: int,
        needs_grad: bool = True,
        offload: bool | str = False,
        grad_dtype: torch.dtype = torch.float32,
        device_budget: int | None = None,
        config=None,
        kv_layer: type[ChunkKVLayer] | None = None,
        sequence=None,
    ):
        self.seq_len, self.needs_grad, self.offload = seq_len, needs_grad, offload
        # Sequence parallelism (engine/sequence_parallel.py): the group whose ranks share the sequence, and
        # the layer class that stores this rank's head shard of each chunk's K/V.
        self.sequence, kv_layer = sequence, kv_layer or ChunkKVLayer
        # K/V gradients accumulate in grad_dtype, or in the K/V's own dtype when that is wider (float64).
        self.grad_dtype, self.device_budget, self._on_device = grad_dtype, device_budget, 0
        self.offset, self.relay, self.kv_start = 0, 1.0, 0
        self.serial = 0  # counts begin_chunk: which layers wrote their K/V in the chunk run last
        self._device_copies = []  # (weakref to storage, layer, which, end) of this chunk's device copies
        self._prefetched = {}  # (layer, which, end) -> (tensor, event)
        self._stream = None
        # With the model's (text) config, each layer gets the cache its type needs: recurrent layers keep
        # their boundary states (engine/state_cache.py), attention layers K/V.
        layers = build_layers(self, config, kv_layer) if config is not None else None
        super().__init__(layers=layers or [kv_layer(self, i) for i in range(num_layers)])

    def begin_chunk(self, start: int, relay: float = 1.0, kv_start: int = 0) -> None:
        """Point the cache at the chunk starting at `start`; `relay` scales the KV gradient handed on to it
        (the chunk's own SpaCO weight 1/q_c; 0 when no later chunk reads its K/V). Attention reads keys from
        `kv_start` on: packed rows whose documents all start at or after it never look further back."""
        assert 0 <= kv_start <= start, (kv_start, start)
        self.offset, self.relay, self.kv_start = start, relay, kv_start
        self.serial += 1
        self._device_copies.clear()

    def check_written(self, chunk: int) -> None:
        """Every attention layer wrote its K/V in the chunk just run. A layer the model ran without this
        cache (transformers' gradient checkpointing sets use_cache=False, a wrapper that drops
        past_key_values) saw no prefix, and no later chunk would see this chunk: refused, never trained on."""
        missed = [
            layer.idx
            for layer in self.layers
            if isinstance(layer, ChunkKVLayer)
            and not isinstance(layer, ChunkStateLayer)
            and layer.written != self.serial
        ]
        if missed:
            raise ValueError(
                f"decoder layers {missed} ran chunk {chunk} without the chunk-wise K/V cache (the model "
                "dropped it: transformers' gradient checkpointing sets use_cache=False, as does a wrapper that "
                "drops past_key_values), so the chunk saw no prefix; turn the model's gradient checkpointing "
                "off and use chunking.checkpoint_layers (ChunkOptions.checkpoint_layers) instead"
            )

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def place(self, nbytes: int, device: torch.device) -> bool:
        """Where a layer's K/V (+ grads) of `nbytes` go: True = host. offload 'auto' keeps layers on the device,
        in order, while they fit in `device_budget` bytes (on CUDA without a budget: the memory free when the
        first layer is placed, less 20% of the device's total as the chunk's own working room)."""
        if self.offload != "auto":
            return bool(self.offload)
        if self.device_budget is None:
            if device.type != "cuda":
                return False  # no separate device memory to spare: keep everything where it is
            free, total = torch.cuda.mem_get_info(device)
            self.device_budget = max(0, free - total // 5)
        if self._on_device + nbytes <= self.device_budget:
            self._on_device += nbytes
            return False
        return True

    # ---- offload: host -> device copies, one layer ahead

    def fetch(self, idx: int, which: str, upto: int, total: int, tail: torch.Tensor | None = None):
        """Device tensor of length `total` whose first `upto` positions come from layer `idx`'s host buffer
        (and the rest from `tail`, the chunk's own K/V); then start copying the next layer's prefix."""
        key = (idx, which, upto, total)
        t = self._take_prefetched(key) if key in self._prefetched else self._copy(idx, which, upto, total)
        if tail is not None:
            t[..., upto:total, :].copy_(tail)
        self._device_copies.append((weakref.ref(t.untyped_storage()), idx, which, total))
        if idx + 1 < len(self.layers) and t.is_cuda and self._holds_kv(idx + 1):  # forward walks upwards
            self._prefetch((idx + 1, which, upto, total))
        return t

    def _holds_kv(self, idx: int) -> bool:
        return isinstance(self.layers[idx], ChunkKVLayer)  # not recurrent-only or MLP-only layers (hybrids)

    def _copy(self, idx, which, upto, total, stream=None):
        buf = self.layers[idx].buffers(which)[0]
        device = self.layers[idx].device
        out = torch.empty(*buf.shape[:2], total, buf.shape[-1], dtype=buf.dtype, device=device)
        out[..., :upto, :].copy_(buf[..., :upto, :], non_blocking=True)
        return out

    def _prefetch(self, key) -> None:
        if key in self._prefetched or not getattr(self.layers[key[0]], "offload", False):
            return  # already on its way, or a layer kept on the device (offload 'auto')
        device = self.layers[key[0]].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))  # host buffers written on the main stream
        with torch.cuda.stream(self._stream):
            t = self._copy(*key)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._prefetched[key] = (t, event)

    def _take_prefetched(self, key):
        t, event = self._prefetched.pop(key)
        torch.cuda.current_stream(t.device).wait_event(event)
        t.record_stream(torch.cuda.current_stream(t.device))  # allocated on the side stream, used here
        return t

    @contextlib.contextmanager
    def saved_kv_offloaded(self):
        """While a chunk's graph is built, swap the device K/V copies attention saves for handles."""
        if not self.offload:
            with self.states_protected():  # recurrent layers' handed-out states (engine/state_cache.py)
                yield
            return

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            for ref, idx, which, end in self._device_copies:
                if ref() is storage:
                    return ("kv", idx, which, end, t.size(), t.stride(), t.storage_offset())
            return self.pack_state(t)

        def unpack(x):
            if not (isinstance(x, tuple) and x and x[0] == "kv"):
                return x
            _, idx, which, end, size, stride, offset = x
            with torch.no_grad():
                fetched = self.fetch_for_backward(idx, which, end)
            return fetched.as_strided(size, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def fetch_for_backward(self, idx: int, which: str, end: int) -> torch.Tensor:
        key = (idx, which, end, end)
        t = self._take_prefetched(key) if key in self._prefetched else self._copy(idx, which, end, end)
        if idx > 0 and t.is_cuda and self._holds_kv(idx - 1):  # backward walks layers downwards
            self._prefetch((idx - 1, which, end, end))
        return t


def kv_grad_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a ChunkOptions.kv_grad_dtype name (validated there)."""
    return getattr(torch, name)


def cache_argument(module) -> str:
    """transformers 5.24 renamed the models' `past_key_values` argument to `cache` (the old name warns and
    goes in 5.40): pass it by the name the installed version's forward declares. Before 5.24 the Mamba-style
    models call it `cache_params`; a name the forward does not declare would vanish into its **kwargs and
    the model would run without our cache (silently wrong gradients), so that is an error."""
    base = base_model(module)
    declared = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values", "cache_params"):
        if name in declared:
            return name
    raise ValueError(f"{type(base).__name__}.forward takes no cache argument: chunk-wise training needs one")
