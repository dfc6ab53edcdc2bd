"""Sequence parallelism inside a chunk (Ulysses), with the K/V checkpoints stored as head shards.

P ranks (a "sequence group") share one sequence. Each chunk [s, e) is split along the sequence: rank r holds
the tokens s + r*m .. s + (r+1)*m - 1 (m = (e - s) / P) through embeddings, norms, MLPs and its slice of the
loss, with their global position_ids (RoPE). Attention switches to heads with an all-to-all:

    q, k, v   [b, H, m, d] (sequence shard, all heads)  ->  [b, H/P, e - s, d] (the whole chunk, H/P heads)

K/V switch *before* the cache update, so the cache of each rank holds the K/V (and K/V gradients) of its
H/P heads for the whole sequence: K/V memory per rank is 1/P of one rank's, and the all-to-all moves only
the chunk's tokens, never the prefix. Attention runs the chunk's queries of those heads against the cached
prefix + chunk (engine/attention.py's kernels) and the output switches back to the sequence shard with the
inverse all-to-all. The deposit / relay of K/V gradients (engine/kv_cache.py) then works per head shard
unchanged: it is the same autograd function on a narrower buffer. K/V heads fewer than P are replicated
(each rank gets the K/V head its query heads read), as DeepSpeed's Ulysses does; their gradients add up in
the backward of the replication.

The all-to-all is DeepSpeed's own autograd function (`deepspeed.sequence.layer._SeqAllToAll`, batch-first
layout [b, s, h, d], scatter heads / gather sequence and back); it runs on gloo's `all_to_all_single` too.

Masks: a rank's model forward sees m tokens, but attention sees the whole chunk, so the model's own mask
(built for m queries) is of no use. The attention registered here ignores it and takes the chunk's mask from
the step (`ChunkShard.masks`: None for plain causal attention, else the additive masks engine/documents.py
builds for documents and sliding windows over the whole chunk); the mask interface registered with it
returns None, so the model builds none.

Hybrid models' recurrent mixers switch to heads the same way (engine/sharded_mixers.py), their boundary
states then 1/P per rank; mixers it cannot split run on the gathered chunk (`mixers_over_group`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from engine.attention import lower_right_causal, masked_attention
from engine.documents import Documents, document_mask, layer_kinds
from engine.kv_cache import ChunkKVLayer
from engine.sharded_mixers import head_sharded, layout_of
from engine.state_cache import has_states
from engine.unwrap import base_model

logger = logging.getLogger(__name__)

ATTENTION = "seco_ulysses"  # the attention models select while a sequence-parallel step runs
SHARD_KWARG = "seco_chunk_shard"  # the model-forward keyword that carries the chunk's shard to attention


class SequenceGroup:
    """The P ranks of a torch.distributed group that share one sequence (same rows on every rank)."""

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise ValueError("sequence parallelism needs an initialised torch.distributed process group")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        _deepspeed_comm()  # DeepSpeed's all-to-all runs through deepspeed.comm

    def shard(self, s: int, e: int) -> tuple[int, int]:
        """This rank's tokens of the chunk [s, e); the engine pads sequences so that P divides every chunk."""
        n = e - s
        assert n % self.size == 0, (s, e, self.size)
        m = n // self.size
        return s + self.rank * m, s + (self.rank + 1) * m

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[b, h, m, d] sequence shard -> [b, h / P, P * m, d] head shard of the whole chunk (with gradient)."""
        from deepspeed.sequence.layer import _SeqAllToAll

        y = _SeqAllToAll.apply(self.group, x.transpose(1, 2), 2, 1, 0)  # scatter heads, gather sequence
        return y.transpose(1, 2)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[b, h / P, n, d] head shard -> [b, n / P, h, d] (attention's output layout), with gradient."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x.transpose(1, 2).contiguous(), 1, 2, 0)

    def channels_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[b, m, C] sequence shard -> [b, P * m, C / P]: the r-th block of C / P channels over the whole
        chunk on rank r (a recurrent mixer's projections, engine/sharded_mixers.py), with gradient."""
        from deepspeed.sequence.layer import _SeqAllToAll

        b, m, c = x.shape
        y = _SeqAllToAll.apply(self.group, x.reshape(b, m, self.size, c // self.size), 2, 1, 0)
        return y.reshape(b, self.size * m, c // self.size)

    def channels_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[b, n, C / P] this rank's channel block of the whole chunk -> [b, n / P, C], with gradient."""
        from deepspeed.sequence.layer import _SeqAllToAll

        b, n, c = x.shape
        y = _SeqAllToAll.apply(self.group, x.reshape(b, n, 1, c).contiguous(), 1, 2, 0)
        return y.reshape(b, n // self.size, self.size * c)

    def kv_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """K or V [b, hk, m, d] -> this rank's K/V heads over the whole chunk; hk < P: replicated first."""
        hk = x.shape[1]
        if hk < self.size:
            x = x.repeat_interleave(self.size // hk, dim=1)  # rank r then gets K/V head r * hk // P
        return self.to_heads(x)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def sum_grads(self, params) -> None:
        """Plain (non-DeepSpeed) training: each rank's .grad holds its tokens' share; the step's gradient is
        their sum (one all-reduce per tensor, in place: no copy of the gradients is ever made)."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # another rank may hold a gradient here: the sum needs a slot
            dist.all_reduce(p.grad, group=self.group)


def check_model(cfg, p: int) -> None:
    """Refuse, by name and reason, the models a sequence group of `p` ranks cannot split (text config)."""
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % p:
        raise ValueError(
            f"{cfg.model_type}: parallel.sequence={p} must divide the attention heads ({heads}): each rank "
            "attends H/P heads"
        )
    if kv % p and p % kv:
        raise ValueError(
            f"{cfg.model_type}: parallel.sequence={p} and the K/V heads ({kv}) must divide one another (K/V "
            "heads are split over ranks, or replicated when fewer than P)"
        )
    recurrent = has_states(cfg)
    if recurrent and cfg.model_type not in HYBRID_FAMILIES:
        raise ValueError(
            f"{cfg.model_type}: parallel.sequence={p}: its recurrent (linear-attention / SSM) mixers are not "
            f"run over a sequence group; the hybrid families that are: {HYBRID_FAMILIES}"
        )
    allowed = {"full_attention", "sliding_attention"} | (
        {"linear_attention", "hybrid", "mlp", "moe"} if recurrent else set()
    )
    other = set(layer_kinds(cfg)) - allowed
    if other:
        raise ValueError(
            f"{cfg.model_type}: parallel.sequence={p} does not support layers of kind {sorted(other)}"
        )


# Hybrid families run over a sequence group (tested exact, tests/test_sequence_parallel.py): each recurrent
# mixer (the decoder layer's child of one of MIXER_NAMES in the layers transformers' cache mapping calls
# linear_attention or hybrid) is split by heads where engine/sharded_mixers.py knows its class and P divides its key heads
# (groups), else it runs on the gathered chunk (`gathered_mixers`). Other hybrids are refused by name.
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "nemotron_h", "falcon_h1")
MIXER_NAMES = ("linear_attn", "mixer", "mamba")
MIXER_KINDS = ("linear_attention", "hybrid")  # hybrid: attention and a mixer side by side (Falcon-H1)


def recurrent_mixers(model, cfg) -> list[torch.nn.Module]:
    """The recurrent mixer of every layer transformers' cache mapping calls linear_attention or hybrid."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    base = base_model(model)
    types, _ = get_layer_types_and_kwargs(cfg)
    mixers = []
    for layer, kind in zip(base.model.layers, types):
        if kind in MIXER_KINDS:
            mixers += [getattr(layer, n) for n in MIXER_NAMES if hasattr(layer, n)][:1]
    if len(mixers) != sum(kind in MIXER_KINDS for kind in types):
        raise ValueError(f"{cfg.model_type}: a recurrent layer without a mixer named one of {MIXER_NAMES}")
    return mixers


@contextlib.contextmanager
def mixers_over_group(model, cfg, group: SequenceGroup):
    """For one step: recurrent mixers split by heads where they can be, the others on the gathered chunk."""
    sharded, gathered = [], []
    for mixer in recurrent_mixers(model, cfg):
        layout = layout_of(mixer, group.size)
        if layout is None:
            gathered.append(mixer)
        else:
            sharded.append((mixer, layout))
    if gathered:
        _say_gathered(cfg.model_type, group.size)
    with head_sharded(sharded, group), gathered_mixers(gathered, group):
        yield


class _GatherSequence(torch.autograd.Function):
    """[b, m, ...] sequence shards -> [b, P * m, ...] the whole chunk on every rank. Backward: every rank's
    gradient of the whole chunk summed, this rank's shard kept (a reduce-scatter, as an all-reduce + slice:
    gloo has no reduce-scatter). DeepSpeed's sequence-parallel pieces are all-to-alls only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: SequenceGroup):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size)]
        dist.all_gather(parts, x.contiguous(), group=group.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        grad = group.all_sum(grad.contiguous())
        m = grad.shape[1] // group.size
        return grad[:, group.rank * m : (group.rank + 1) * m], None


@contextlib.contextmanager
def gathered_mixers(mixers: list[torch.nn.Module], group: SequenceGroup):
    """For one step, run each of `mixers` on the whole chunk on every rank and keep this rank's tokens of its
    output: exact (the mixer sees what it sees without sequence parallelism), with the mixer's compute and
    boundary states replicated on the P ranks, not split. Each rank's boundary-state gradients are its own
    tokens' share (the relay is linear), summed in the parameters like every other share."""

    def before(_module, args, kwargs):
        if args:
            return (_GatherSequence.apply(args[0], group), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _GatherSequence.apply(kwargs["hidden_states"], group)}

    def after(_module, _args, _kwargs, out):
        first = out[0] if isinstance(out, tuple) else out
        m = first.shape[1] // group.size
        mine = first[:, group.rank * m : (group.rank + 1) * m]
        return (mine, *out[1:]) if isinstance(out, tuple) else mine

    handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in mixers]
    handles += [m.register_forward_hook(after, with_kwargs=True) for m in mixers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@functools.cache
def _say_gathered(model_type: str, p: int) -> None:
    """Once per process and family."""
    logger.warning(
        "parallel.sequence=%d: %s's recurrent mixers run on the whole chunk on every rank (exact; their compute "
        "and boundary states are replicated, not split over the group: engine/sharded_mixers.py splits only "
        "the mixer classes it knows, and only when P divides their key heads or groups)",
        p,
        model_type,
    )


@dataclass
class ChunkShard:
    """What attention needs of the chunk a sequence-parallel forward runs: the group, and the additive masks
    over the whole chunk (None: plain causal; a tensor: every layer; a dict: per layer kind)."""

    group: SequenceGroup
    masks: torch.Tensor | dict[str, torch.Tensor] | None
    kinds: list[str]

    def mask_for(self, layer_idx: int | None) -> torch.Tensor | None:
        if not isinstance(self.masks, dict):
            return self.masks
        return self.masks[self.kinds[layer_idx]]


def chunk_masks(cfg, docs: Documents | None, s: int, e: int, lo: int, dtype: torch.dtype, batch: int, device):
    """The masks of chunk [s, e) over keys [lo, e), or None where bottom-right causal is the whole pattern
    (right padding needs no mask: see engine/attention.py). Sliding windows without documents use the same
    builder with every token in one document."""
    if docs is None and "sliding_attention" not in layer_kinds(cfg):
        return None
    if docs is None:
        ids = torch.zeros(batch, e, dtype=torch.long, device=device)
        docs = Documents(ids, torch.zeros_like(ids))
    return document_mask(cfg, docs, None, s, e, lo, dtype)


class SequenceStep:
    """What one chunk-wise step does differently when the P ranks of `group` share its sequence.

    Gradient scale. Each rank backprops its own tokens' CE (and router share); the step's gradient is the
    sum over the group's ranks. A plain model sums the group's .grad at the end of the step (`finish`).
    DeepSpeed, given the sequence-parallel `mpu` (`deepspeed.runtime.sequence_parallel.parallel_state_sp`),
    sums over the data x sequence ranks and divides by a count that depends on the ZeRO stage (DeepSpeed
    0.19.8): ZeRO 0-2 and ZeRO-3's all-reduce path divide by the data-parallel size (world / P), ZeRO-3's
    reduce-scatter path (the default) by the whole world. The objective's scale is that divisor over N, the
    global count of target tokens (each group's rows counted once)."""

    def __init__(self, group: SequenceGroup, backend, cfg, chunk_size: int):
        self.group, self.cfg, self.module = group, cfg, backend.module
        self.plain = not backend.must_backward  # LocalBackend: nobody else reduces the group's gradients
        p = group.size
        check_model(cfg, p)
        if chunk_size % p:
            raise ValueError(
                f"chunking.chunk_size={chunk_size} must be a multiple of parallel.sequence={p}: each rank "
                "holds chunk_size / P tokens of every chunk"
            )
        if not self.plain and getattr(backend.engine, "sequence_parallel_size", 1) != p:
            raise ValueError(
                f"parallel.sequence={p}: the DeepSpeed engine reduces gradients over "
                f"{getattr(backend.engine, 'sequence_parallel_size', 1)} sequence ranks; pass DeepSpeed's "
                "sequence-parallel mpu to deepspeed.initialize"
            )
        self.kinds = layer_kinds(cfg)
        self.divisor = None if self.plain else _deepspeed_divisor(backend.engine, p)
        # The router share is each data-parallel group's own (engine/moe.py), summed over its P ranks: undo
        # whatever DeepSpeed divides by beyond the data-parallel size.
        self.router_factor = 1.0 if self.plain else self.divisor / (dist.get_world_size() // p)

    @classmethod
    def of(cls, backend, group, cfg, chunk_size: int) -> SequenceStep | None:
        """The step's sequence group: `group` if given, else the DeepSpeed engine's own; None when P = 1."""
        if (
            group is None
            and backend.must_backward
            and getattr(backend.engine, "sequence_parallel_size", 1) > 1
        ):
            group = SequenceGroup(backend.engine.seq_parallel_group)
        if group is None or group.size == 1:
            return None
        return cls(group, backend, cfg, chunk_size)

    @contextlib.contextmanager
    def forward_context(self, config):
        """Around both passes: the head-switching attention, and recurrent mixers split by heads (or gathered)."""
        with ulysses_attention(config), mixers_over_group(self.module, self.cfg, self.group):
            yield

    def padded_length(self, seq_len: int) -> int:
        """Right padding (masked, never a target) makes P divide the last chunk too."""
        p = self.group.size
        return -(-seq_len // p) * p

    def row_tokens(self, agreed: int) -> int:
        """DeepSpeed's backend sums the target count over every rank, the group's P copies of a row included."""
        return agreed if self.plain else agreed // self.group.size

    def grad_scale(self, world_size: int, num_tokens: int) -> float:
        return (world_size if self.plain else self.divisor) / max(num_tokens, 1)

    def check_draw(self, selected: list[int], k: int) -> None:
        """SpaCO: every rank of the group must visit the same chunks (one seed); a difference is a deadlock
        or a wrong gradient, so it is an error."""
        device = next(self.module.parameters()).device  # NCCL reduces device tensors only
        flags = torch.zeros(2, k, dtype=torch.float64, device=device)
        flags[0, selected] = 1.0
        flags[1] = -flags[0]
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group.group)
        if not torch.equal(flags[0], -flags[1]):
            raise ValueError(
                "SpaCO drew different chunks on the ranks of one sequence group: seed the generator alike"
            )

    def chunk_kwargs(self, docs, s: int, e: int, lo: int, dtype, batch: int, device) -> dict:
        masks = chunk_masks(self.cfg, docs, s, e, lo, dtype, batch, device)
        return {SHARD_KWARG: ChunkShard(self.group, masks, self.kinds)}

    def reduce_router(self, router) -> None:
        """Routing counts of the whole chunk: each rank saw its tokens only (after pass 1)."""
        if router.counts is None:
            return
        rows = torch.tensor([router.rows], dtype=torch.float64, device=router.counts.device)
        for t in (router.counts, router.prob_sum, rows):
            self.group.all_sum(t)
        router.rows = float(rows)

    def total_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The group's loss sum for a plain model; DeepSpeed's backend sums over every rank itself."""
        return self.group.all_sum(loss_sum) if self.plain else loss_sum

    def begin(self, params) -> None:
        """Plain model, before pass 2: what .grad already holds (earlier steps, the same on every rank) is
        divided by P, so that the sum over the group at the end counts it once (no copy of the gradients)."""
        if self.plain:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.group.size)

    def finish(self, params) -> None:
        """Plain model: sum the group's gradients (the step's shares, and P times 1/P of what was there)."""
        if self.plain:
            self.group.sum_grads(params)


class HeadShardedKVLayer(ChunkKVLayer):
    """A decoder layer's K/V cache on one rank of a sequence group: the K/V heads of this rank over the
    whole sequence. The chunk's K/V arrive as this rank's sequence shard with all heads and leave the
    all-to-all as the whole chunk with this rank's heads, before they are appended."""

    def update(self, key_states, value_states, *args, **kwargs):
        group = self.cache.sequence
        return super().update(group.kv_to_heads(key_states), group.kv_to_heads(value_states), *args, **kwargs)


def ulysses_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention interface: query [b, H, m, d] (this rank's tokens), key / value [b, Hk/P, L, d] (this rank's
    heads, prefix + whole chunk, from HeadShardedKVLayer); returns [b, m, H, d] as transformers expects."""
    shard: ChunkShard | None = kwargs.get(SHARD_KWARG)
    if shard is None:
        raise ValueError(f"{ATTENTION}: attention selected outside a sequence-parallel chunk-wise step")
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError(f"{ATTENTION}: attention softcapping and position biases are not supported")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise ValueError(f"{ATTENTION}: only causal attention is supported")
    q = shard.group.to_heads(query)
    mask = shard.mask_for(getattr(module, "layer_idx", None))
    if mask is not None:
        out = masked_attention(q, key, value, mask, dropout, scaling, q.shape[1] // key.shape[1])
    else:
        out = lower_right_causal(q, key, value, dropout=dropout, scale=scaling)
    return shard.group.to_sequence(out), None


def _no_mask(*args, **kwargs):
    """The model builds no mask of its own: attention takes the whole chunk's from the step."""
    return None


AttentionInterface.register(ATTENTION, ulysses_attention_forward)
AttentionMaskInterface.register(ATTENTION, _no_mask)


@contextlib.contextmanager
def ulysses_attention(config):
    """Select `ATTENTION` on the model's (text) config for one step; sdpa and eager models only (the kernels
    are engine/attention.py's either way)."""
    previous = config._attn_implementation
    if previous not in ("sdpa", "eager"):
        raise ValueError(
            f"{config.model_type}: sequence parallelism runs its own attention; attn_implementation "
            f"{previous!r} is not supported (use sdpa)"
        )
    config._attn_implementation = ATTENTION
    try:
        yield ATTENTION
    finally:
        config._attn_implementation = previous


def sequence_mpu(p: int):
    """DeepSpeed's own sequence-parallel groups (consecutive ranks form a group; data x sequence ranks share
    ZeRO's partitions and gradient reduction) for `deepspeed.initialize(mpu=...)`; None when P = 1."""
    if p == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(p)
    return parallel_state_sp


def _deepspeed_divisor(engine, p: int) -> int:
    """What DeepSpeed divides the gradient sum over data x sequence ranks by (see SequenceStep)."""
    world = dist.get_world_size()
    if engine.zero_optimization_stage() != 3:
        return world // p
    if not engine.zero_reduce_scatter():
        raise ValueError(
            f"parallel.sequence={p} with ZeRO-3 and zero_optimization.reduce_scatter false: DeepSpeed then "
            "averages small gradient buckets over data-parallel ranks and large ones over data x sequence "
            "ranks; keep reduce_scatter true (the default)"
        )
    return world


def _deepspeed_comm() -> None:
    """DeepSpeed's all-to-all calls deepspeed.comm, which wraps the process group torch.distributed already
    has; join it once if the caller runs without deepspeed.initialize (plain torch training, tests)."""
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
