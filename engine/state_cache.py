"""Recurrent layers' states (linear attention, SSM, short convolutions) as checkpoints at chunk boundaries.

A linear-attention or state-space layer carries, from one token to the next, a conv state (the last K inputs
of its short causal convolution) and a recurrent state (e.g. heads x d_k x d_v). At a chunk boundary these
are to the layer what the K/V prefix is to an attention layer: all that chunk c needs from chunks < c. They
go through transformers' own Cache API (`get_conv_state`, `update_conv_state`, `get_recurrent_state`,
`update_recurrent_state`, `is_recording_past`), so no model class is patched:

  pass 1 (no grad)  each chunk starts from the states recorded at its start boundary and records the states
                    it ends with at the next one: O(1) bytes per boundary, whatever the sequence length.
  pass 2            chunk c restarts from boundary c's states as leaves that require grad; backward deposits
                    their gradient for chunk c-1 ("deposit"). The states chunk c ends with receive the gradient
                    chunk c+1 deposited, times chunk c's compensation weight ("relay"), exactly as
                    `_AppendKV` does for K/V (engine/kv_cache.py), so SeCO's gradient is exact and SpaCO's
                    paths through state hops carry one 1/q per chunk as paths through K/V do.

The final states are not consumed by anything later in the chunk's graph, so the relay rides on the scalar
that pass 2 back-propagates (`ChunkKVCache.with_state_relays`): an identity whose backward hands each final
state relay * G. Like `_AppendKV` it ignores the incoming gradient's scale, since G already carries it.

Models take their multi-token path (conv state prepended, `initial_state` used) because
`is_recording_past` is True here; their single-token decode kernels update the handed-out state in place
(`state.copy_(...)`) instead of calling `update_recurrent_state`: the cache hands out a copy, reads the
final state back from it, and `protect` keeps the value autograd saved before the in-place write.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import (
    CacheLayerMixin,
    DummyLayer,
    LinearAttentionCacheLayerMixin,
    get_layer_types_and_kwargs,
)

# Layer types of transformers' cache mapping and which of our layers holds them.
KV_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
STATE_TYPES = ("linear_attention", "conv")
HYBRID_TYPES = ("hybrid", "hybrid_sliding")  # attention and a recurrent mixer side by side in one layer
NO_CACHE_TYPES = ("dummy",)  # MLP / MoE-only layers (Nemotron-H)
RECURRENT_LAYER_TYPES = STATE_TYPES + HYBRID_TYPES + NO_CACHE_TYPES + ("mlp", "moe")

# Families whose recurrent layers do not go through the Cache API, or cannot continue a multi-token chunk
# from a given state: refused with the missing piece named, never run silently wrong.
_MAMBA1 = (
    "its Mamba-1 mixer's multi-token selective scan takes no initial state: a chunk longer than one token "
    "would restart from a zero state instead of the previous chunk's (only single-token decoding reads it)"
)
REFUSED = {
    "mamba": _MAMBA1,
    "falcon_mamba": _MAMBA1,
    "jamba": _MAMBA1,
    "zamba": _MAMBA1,
    "minimax": "its lightning-attention layers keep their state in MiniMaxCache.set_linear_cache (a cache "
    "class of its own), not through transformers' Cache API (get/update_recurrent_state)",
    "rwkv": "its recurrent state travels in the model's own `state` argument, not through transformers' Cache "
    "API, so a chunk cannot start from a checkpointed state",
    "xlstm": "its recurrent state lives in its own xLSTMCache, not in transformers' Cache API",
    "recurrent_gemma": "its RG-LRU layers keep their state in module attributes (self.recurrent_states), not in "
    "transformers' Cache API",
}
# Recurrent families whose chunk-wise gradient tests/test_hybrid.py checks against full backprop. Others
# with recurrent layers are refused until checked: a family's kernels may keep state the API does not see.
VERIFIED = (
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "kimi_linear",
    "olmo_hybrid",
    "falcon_h1",
    "bamba",
    "granitemoehybrid",
    "nemotron_h",
    "mamba2",
    "zamba2",
    "lfm2",
)


def check_family(config) -> None:
    """ValueError naming the family and the missing piece for recurrent models we cannot checkpoint."""
    family = config.model_type
    if family in REFUSED:
        raise ValueError(f"{family}: not supported by chunk-wise training: {REFUSED[family]}")
    if has_states(config) and family not in VERIFIED:
        raise ValueError(
            f"{family}: its recurrent (linear-attention / SSM) layers are not verified exact for chunk-wise "
            f"training yet (their kernels may keep state the Cache API does not carry); verified: {VERIFIED}"
        )


def has_states(config) -> bool:
    types = getattr(config, "layer_types", None) or []
    return any(t in STATE_TYPES + HYBRID_TYPES for t in types)


class _Relay(torch.autograd.Function):
    """Identity on the back-propagated scalar; backward hands each final state relay * G (G already carries
    any loss scaling, as the K/V relay does)."""

    @staticmethod
    def forward(ctx, objective, relay, grads, *finals):
        ctx.relay, ctx.grads = relay, grads
        return objective.clone()

    @staticmethod
    def backward(ctx, grad):
        relayed = [g.mul(ctx.relay) for g in ctx.grads]
        return (grad, None, None, *relayed)


class OwnerRef:
    """A cache layer's `cache` attribute, held weakly: a strong reference makes the cache and its layers a
    reference cycle, and the step's K/V, states and their gradients would stay allocated after the step until
    Python's cyclic collector happens to run (measured: one step's K/V alive in every later micro-batch of an
    accumulated step)."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = f"_{name}_ref"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        cache = obj.__dict__[self.slot]()
        assert cache is not None, "a cache layer outlived its cache"
        return cache

    def __set__(self, obj, cache) -> None:
        obj.__dict__[self.slot] = weakref.ref(cache)


class ChunkStateLayer(LinearAttentionCacheLayerMixin):
    """One recurrent layer's conv / recurrent states at every chunk boundary, and their gradients in pass 2.

    `at[b][key]` is the state at boundary b (before token b), key = ("conv" | "rec", state_idx);
    `grad_at[b][key]` what the chunk starting at b deposited on it in pass 2.
    """

    cache = OwnerRef()

    def __init__(self, cache, idx: int, number_of_states: int = 1, **kwargs):
        LinearAttentionCacheLayerMixin.__init__(self, number_of_states=number_of_states)
        self.cache, self.idx = cache, idx
        self.offload = False  # states stay on the device (small); shadows the mixin's offload() we never use
        # Models gate their in-place single-token conv kernels on this: take the path through the cache.
        self.record_past = True
        self.at: dict[int, dict] = {}
        self.grad_at: dict[int, dict] = {}
        self._chunk = None  # (offset, grad mode) of the chunk the handed/written states belong to
        self._handed: dict = {}  # key -> (first tensor given to the model, its version then)
        self._sources: dict = {}  # key -> the boundary state (a leaf with a deposit hook in pass 2)
        self._copies: list = []  # every copy handed out this chunk (their saved values are protected)
        self._written: dict = {}  # key -> final state the model handed back this chunk
        self._kernel: dict = {}

    # ---- the chunk being run

    def _sync(self) -> None:
        """On the first call of a new chunk, file the previous chunk's final states (pass 1)."""
        here = (self.cache.offset, torch.is_grad_enabled())
        if self._chunk == here:
            return
        prev = self._chunk
        if (
            prev is not None and not prev[1] and here[0] > prev[0]
        ):  # pass 1 moved on: its finals are boundary s
            # Copies: a final state is often a view into a chunk-sized tensor (the conv input, the scan's
            # per-block states), whose storage would otherwise stay alive with it.
            self.at[here[0]] = {k: t.detach().clone() for k, t in self._finals().items()}
        self._chunk, self._handed, self._written, self._sources, self._copies = here, {}, {}, {}, []
        for i in range(self.number_of_states):
            self.has_previous_state[i] = self.cache.offset > 0

    def _finals(self) -> dict:
        """The states this chunk ended with: handed back through update_*, or written in place into the copy
        we handed out (single-token decode kernels)."""
        out = dict(self._written)
        for key, (t, version) in self._handed.items():
            if key not in out and t._version != version:
                out[key] = t
        missing = [k for k in self._handed if k not in out]
        if missing:
            raise RuntimeError(
                f"layer {self.idx}: the model read the {missing} state(s) but handed no final state back "
                "(neither update_conv_state/update_recurrent_state nor an in-place write)"
            )
        return out

    def _entering(self, kind: str, state_idx: int) -> torch.Tensor | None:
        """The state the chunk starts from: None for the first chunk (the model's own prefill path)."""
        self._sync()
        s = self.cache.offset
        key = (kind, state_idx)
        if s == 0:
            return None
        if key not in self._sources:
            saved = self.at.get(s, {}).get(key)
            assert saved is not None, f"no {key} state recorded at boundary {s} (pass 1 must run every chunk)"
            if torch.is_grad_enabled() and self.cache.needs_grad:
                saved = saved.detach().requires_grad_()
                saved.register_hook(self._depositor(s, key))
            self._sources[key] = saved
        # A fresh copy per call: the model may write into it (decode kernels), never into the checkpoint, and
        # a recompute of the layer (checkpoint_layers) must see the entering state, not the written one.
        t = self._sources[key].clone()
        self._copies.append(t)
        self._handed.setdefault(key, (t, t._version))  # the forward's own copy: its in-place final state
        return t

    def _depositor(self, boundary: int, key):
        def deposit(g: torch.Tensor) -> None:
            acc = torch.promote_types(g.dtype, torch.float32)
            slot = self.grad_at.setdefault(boundary, {})
            slot[key] = g.to(acc) if key not in slot else slot[key].add_(g)

        return deposit

    def relays(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(final states of this chunk, the gradient the next chunk deposited on each), for the relay."""
        self._sync()
        later = [b for b in self.at if b > self.cache.offset]
        if not later:
            return [], []
        deposited = self.grad_at.pop(min(later), {})
        finals, grads = [], []
        for key, t in self._finals().items():
            if key in deposited and t.requires_grad:
                finals.append(t)
                grads.append(deposited[key].to(t.dtype))
        return finals, grads

    def protects(self, ptr: int) -> bool:
        return any(h.untyped_storage().data_ptr() == ptr for h in self._copies)

    # ---- transformers' LinearAttention cache interface

    def lazy_initialization(self, *args, **kwargs) -> None:  # states are recorded, never preallocated
        return None

    def state(self, kind: str, state_idx: int = 0) -> torch.Tensor | None:
        return self._entering(kind, state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size=None, **kw):
        """Return what the causal conv must see (the previous K inputs, then the chunk's), as transformers'
        LinearAttentionLayer does, and note the last K inputs as the chunk's final conv state."""
        k = self._kernel.setdefault(state_idx, conv_kernel_size or conv_states.shape[-1])
        prev = self._entering("conv", state_idx)
        if prev is None:
            full = (
                F.pad(conv_states, (k - conv_states.shape[-1], 0))
                if conv_states.shape[-1] < k
                else conv_states
            )
        else:
            full = torch.cat([prev, conv_states], dim=-1)
        self._written[("conv", state_idx)] = full[..., -k:]
        return full

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, state_idx: int = 0, **kw
    ) -> torch.Tensor:
        self._sync()
        self._written[("rec", state_idx)] = recurrent_states
        return recurrent_states

    def get_seq_length(self) -> int:
        return self.cache.offset

    def state_bytes(self) -> int:
        """Checkpointed states (every boundary) and the gradients deposited on them, now."""
        return sum(
            t.numel() * t.element_size()
            for slot in (*self.at.values(), *self.grad_at.values())
            for t in slot.values()
        )

    def kv_bytes(self) -> int:
        return self.state_bytes()


class _NoCacheLayer(DummyLayer):
    """MLP / MoE-only layers: nothing to checkpoint."""

    offload = False  # nothing in host memory either

    def kv_bytes(self) -> int:
        return 0


def state_layer_class(kv_layer_cls):
    """The layer class for `hybrid` layers: the K/V checkpoints of `kv_layer_cls` plus recurrent states."""

    class ChunkHybridLayer(kv_layer_cls, ChunkStateLayer):
        def __init__(self, cache, idx: int, number_of_states: int = 1, **kwargs):
            ChunkStateLayer.__init__(self, cache, idx, number_of_states=number_of_states)
            kv_layer_cls.__init__(self, cache, idx)  # last: its K/V placement owns `offload`

        def lazy_initialization(self, *args, **kwargs) -> None:
            if len(args) == 2:  # K/V, from update()
                kv_layer_cls.lazy_initialization(self, *args)

        def get_seq_length(self) -> int:
            return self.cache.offset

        def kv_bytes(self) -> int:
            return kv_layer_cls.kv_bytes(self) + self.state_bytes()

    return ChunkHybridLayer


def build_layers(cache, config, kv_layer_cls) -> list:
    """One cache layer per decoder layer, by transformers' own layer types for this config."""
    types, kwargs = get_layer_types_and_kwargs(config)
    hybrid = state_layer_class(kv_layer_cls)
    layers = []
    for i, (t, kw) in enumerate(zip(types, kwargs)):
        n = kw.get("number_of_states", 1)
        if t in STATE_TYPES:
            layers.append(ChunkStateLayer(cache, i, number_of_states=n))
        elif t in HYBRID_TYPES:
            layers.append(hybrid(cache, i, number_of_states=n))
        elif t in NO_CACHE_TYPES:
            layers.append(_NoCacheLayer())
        else:
            layers.append(kv_layer_cls(cache, i))
    return layers


class StateCacheMixin:
    """The Cache-level half of the interface for `ChunkKVCache`: recurrent layers hand out their boundary
    states themselves (transformers' Cache reads `layer.conv_states` directly, which we never fill)."""

    def state_layers(self) -> list[ChunkStateLayer]:
        return [layer for layer in self.layers if isinstance(layer, ChunkStateLayer)]

    def state_bytes(self) -> int:
        """The recurrent layers' boundary states and their gradients: the part of kv_bytes() they hold."""
        return sum(layer.state_bytes() for layer in self.state_layers())

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        return self._state_layer(layer_idx).state("conv", state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        return self._state_layer(layer_idx).state("rec", state_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.offset > 0

    def is_recording_past(self, layer_idx: int) -> bool:
        return isinstance(self.layers[layer_idx], ChunkStateLayer)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.offset  # every layer's prefix ends where the chunk starts (also all-recurrent models)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # Every attention layer reports the same sizes; models without one (all-Mamba Bamba / Granite configs)
        # still build a causal mask for none.
        for layer in self.layers[layer_idx:] + self.layers[:layer_idx]:
            if isinstance(layer, CacheLayerMixin):
                return layer.get_mask_sizes(query_length)
        return self.offset + query_length - self.kv_start, self.kv_start

    def _state_layer(self, layer_idx: int) -> ChunkStateLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, ChunkStateLayer):
            raise RuntimeError(
                f"layer {layer_idx} reads a recurrent state, but the config's layer_types give it a "
                f"{type(layer).__name__}: set layer_types so the cache knows its recurrent layers"
            )
        return layer

    def with_state_relays(self, objective: torch.Tensor) -> torch.Tensor:
        """Pass 2: `objective` (the scalar about to be back-propagated), carrying the relay of every final
        state of this chunk (see the module docstring). Identity where there is nothing to relay."""
        finals, grads = [], []
        for layer in self.state_layers():
            f, g = layer.relays()
            finals += f
            grads += g
        if not finals or not torch.is_grad_enabled() or self.relay == 0.0:
            return objective
        return _Relay.apply(objective, self.relay, grads, *finals)

    def pack_state(self, t: torch.Tensor) -> torch.Tensor:
        """A saved-tensor pack hook: copy the states handed to the model, which its single-token kernels
        overwrite in place after autograd saved them (mamba's selective_state_update does
        `state.copy_(state * dA + dBx)`); anything else is saved as is."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return t
        ptr = t.untyped_storage().data_ptr()
        return t.clone() if any(layer.protects(ptr) for layer in self.state_layers()) else t

    @contextlib.contextmanager
    def states_protected(self):
        """`pack_state` around a chunk's forward (pass 2 only: pass 1 saves nothing)."""
        if not self.state_layers() or not torch.is_grad_enabled():
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(self.pack_state, lambda t: t):
            yield
