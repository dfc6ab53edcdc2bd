"""The sequence-parallel cases: each runs one chunk-wise step, on a sequence group (the worker, P ranks) or
in one process (the reference the test computes), on the same tiny float64 model and batch."""

from __future__ import annotations

import torch
from tiny import VOCAB, grads_of, live_lora, tiny_batch, tiny_model
from tiny_hybrid import HYBRIDS, tiny_hybrid

from engine.chunk_eval import score
from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker

MOE = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
QWEN2_SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)
PACKED_DOCS = [[10, 15, 12], [20, 17]]
ROUTER = dict(output_router_logits=True, router_aux_loss_coef=0.5)
SPACO = dict(chunk_size=8, mode="spaco", sample_prob=0.5)
LAYERS = {"checkpoint_layers": True}

# name -> (config class or tiny_hybrid family, config overrides, LoRA, packed rows, schedule, fused loss,
#          full-backprop reference[, more chunkwise_backward arguments])
CASES = {
    "llama": ("LlamaConfig", {}, False, False, dict(chunk_size=8), False, True),
    "llama_kv1": ("LlamaConfig", {"num_key_value_heads": 1}, False, False, dict(chunk_size=8), False, True),
    "lora": ("LlamaConfig", {}, True, False, dict(chunk_size=8), False, True),
    "fused": ("LlamaConfig", {}, False, False, dict(chunk_size=8), True, True),
    "spaco": ("LlamaConfig", {}, False, False, SPACO, False, False),
    "packed": ("LlamaConfig", {}, False, True, dict(chunk_size=8), False, False),
    "qwen2_sliding": ("Qwen2Config", QWEN2_SLIDING, False, False, dict(chunk_size=8), False, True),
    "moe": ("MixtralConfig", MOE, False, False, dict(chunk_size=8), False, False),
    "checkpoint_layers": ("LlamaConfig", {}, False, False, dict(chunk_size=8), True, True, LAYERS),
    "offload_kv": ("LlamaConfig", {}, False, False, dict(chunk_size=8), False, True, {"offload_kv": True}),
    # two steps accumulate into .grad without zeroing: twice the gradient
    "accumulate": ("LlamaConfig", {}, False, False, dict(chunk_size=8), False, True, {"steps": 2}),
    # hybrids: recurrent mixers split by heads (engine/sharded_mixers.py), attention layers head-sharded
    "qwen3_next": ("qwen3_next", {}, False, False, dict(chunk_size=8), False, True),
    "qwen3_5_spaco": ("qwen3_5_text", {}, False, False, SPACO, False, False),
    # Qwen3.5-MoE with its router loss (routing counts summed over the group)
    "qwen3_5_moe": ("qwen3_5_moe_text", ROUTER, False, False, dict(chunk_size=8), False, False),
    "nemotron_h_sharded": ("nemotron_h", {"n_groups": 2}, False, False, dict(chunk_size=8), False, True),
    # one Mamba-2 group cannot be split over 2 ranks: the mixers run on the gathered chunk
    "nemotron_h": ("nemotron_h", {}, False, False, dict(chunk_size=8), False, False),
    # attention and a Mamba-2 mixer side by side in every layer; the mixers gathered
    "falcon_h1": ("falcon_h1", {}, False, False, dict(chunk_size=8), False, True),
    # checkpointed layers recompute the sharded mixers (and their collectives) inside backward
    "qwen3_next_checkpoint_layers": (
        "qwen3_next",
        {},
        False,
        False,
        dict(chunk_size=8),
        False,
        False,
        LAYERS,
    ),
}

# Hybrid cases whose mixers are split by heads (boundary states halve per rank) or gathered (replicated)
SHARDED_MIXERS = (
    "qwen3_next", "qwen3_5_spaco", "qwen3_5_moe", "nemotron_h_sharded", "qwen3_next_checkpoint_layers",
)  # fmt: skip
GATHERED_MIXERS = ("nemotron_h", "falcon_h1")
# Negative control: the "qwen3_next" case with each rank's heads run on the other rank's per-head parameters
SWAPPED = "qwen3_next_swapped_heads"

# Chunk-wise scoring (engine/chunk_eval.py: eval loss and retrieval's argmax hits) over a sequence group:
# name -> the case of CASES whose model and batch are scored (padded rows, packed documents, a sliding
# window, a hybrid with head-sharded mixers)
SCORES = {
    "score_llama": "llama",
    "score_packed": "packed",
    "score_qwen2_sliding": "qwen2_sliding",
    "score_qwen3_next": "qwen3_next",
}

# The per-rank step peak of the tiny float32 Llama at two lengths: name -> (K/V heads, sequence length). Its
# 2 K/V heads are split one per rank under P = 2; a single K/V head is replicated on both ranks (K/V not split)
PEAK_LENGTHS = (128, 256)
PEAKS = {f"peak_kv{heads}_{n}": (heads, n) for heads in (2, 1) for n in PEAK_LENGTHS}

# Refused by name before any chunk runs: name -> (case, words the error must contain)
REFUSALS = {
    "odd_heads": (
        (
            "LlamaConfig",
            {"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48},
            False,
            False,
            dict(chunk_size=8),
            False,
            False,
        ),
        "must divide the attention heads",
    ),
    "odd_chunk": (
        ("LlamaConfig", {}, False, False, dict(chunk_size=7), False, False),
        "multiple of parallel.sequence",
    ),
    "hybrid": (("bamba", {}, False, False, dict(chunk_size=8), False, False), "recurrent"),
}


def _lora(model):
    torch.manual_seed(3)
    return live_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)


def build(case):
    config_cls, overrides, lora, *_ = case
    if config_cls in HYBRIDS:
        return tiny_hybrid(config_cls, **overrides)
    model = tiny_model(config_cls, **overrides)
    if "num_local_experts" in overrides:  # grouped-mm expert kernels reject float64
        model.config._experts_implementation = "eager"
    return _lora(model) if lora else model


def batch(case):
    packed = case[3]
    ids, labels, mask = tiny_batch(seq=37, pad_from=None if packed else 30)
    position_ids = None
    if packed:
        mask = None
        position_ids = torch.cat(
            [torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in PACKED_DOCS]
        )
    return ids, labels, mask, position_ids


def run_case(case, group=None) -> dict:
    """One step; `group` None: one process without sequence parallelism."""
    model = build(case)
    ids, labels, mask, position_ids = batch(case)
    extra = dict(case[7]) if len(case) > 7 else {}
    for _ in range(extra.pop("steps", 1)):
        stats = chunkwise_backward(
            model,
            ids,
            labels=labels,
            attention_mask=mask,
            position_ids=position_ids,
            schedule=ChunkSchedule(**case[4]),
            options=ChunkOptions(fused_loss=case[5], loss_slice=2, **extra),
            generator=torch.Generator().manual_seed(7),  # SpaCO: every rank (and the reference) draws alike
            sequence_group=group,
        )
    return {
        "grads": grads_of(model),
        "loss": stats.loss,
        "tokens": stats.num_tokens,
        "kv_bytes": stats.kv_bytes,
        "state_bytes": stats.state_bytes,
        "selected": stats.selected,
    }


def score_case(case, group=None) -> dict:
    """The batch's chunk-wise scores, loss and argmax; `group` None: one process. Argmax hits to count: every
    other label is what a plain forward predicts there (a random model gets few right by itself)."""
    model = build(case).eval()
    ids, labels, mask, position_ids = batch(case)
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.argmax(-1)
    hinted = labels.clone()
    hinted[:, 1::2] = torch.where(labels[:, 1::2] == -100, -100, predicted[:, :-1][:, ::2])
    out = {}
    for argmax in (False, True):
        labels = hinted if argmax else labels
        s = score(
            model, ids, labels=labels, attention_mask=mask, position_ids=position_ids,
            chunk_size=case[4]["chunk_size"], options=ChunkOptions(fused_loss=case[5], loss_slice=2),
            argmax=argmax, sequence_group=group,
        )  # fmt: skip
        out["argmax" if argmax else "loss"] = {
            "loss_sum": s.loss_sum, "num_tokens": s.num_tokens, "row_tokens": s.row_tokens,
            "row_correct": s.row_correct,
        }  # fmt: skip
    return out


# SpaCO's unbiasedness over a sequence group: every selection of chunks 1..3 (chunks 0 and 4 always kept)
# with its probability; the expectation of the estimates is SeCO's gradient.
ENUMERATION_PROBS = (1.0, 0.5, 0.3, 0.8, 1.0)


def spaco_expectation(group, compensate: bool = True) -> dict:
    """E[SpaCO estimate] on the "llama" case, each selection's estimate computed by the group; without
    `compensate` the estimates carry weight 1 (a biased estimator the test must tell apart)."""
    import itertools
    import math

    case = CASES["llama"]
    model = build(case)
    ids, labels, mask, _ = batch(case)
    free = [c for c, q in enumerate(ENUMERATION_PROBS) if q < 1]
    total = None
    for bits in itertools.product([0, 1], repeat=len(free)):
        sel = [c for c in range(len(ENUMERATION_PROBS)) if c not in free or bits[free.index(c)]]
        p = math.prod(ENUMERATION_PROBS[c] if c in sel else 1 - ENUMERATION_PROBS[c] for c in free)
        probs = ENUMERATION_PROBS if compensate else (1.0,) * len(ENUMERATION_PROBS)
        model.zero_grad(set_to_none=True)
        chunkwise_backward(
            model,
            ids,
            labels=labels,
            attention_mask=mask,
            schedule=ChunkSchedule(8, mode="spaco", chunk_probs=probs, selected=sel),
            options=ChunkOptions(fused_loss=False),
            sequence_group=group,
        )
        grads = grads_of(model)
        total = (
            {n: p * g for n, g in grads.items()}
            if total is None
            else {n: total[n] + p * grads[n] for n in total}
        )
    return {"grads": total}


def step_peak(kv_heads: int, length: int, group=None) -> dict:
    """Tensor bytes allocated inside one SeCO step on this rank (engine.memory.MemoryTracker) and its K/V bytes:
    the tiny Llama in float32 with `kv_heads` K/V heads, one row of `length` tokens, chunks of 16."""
    model = tiny_model("LlamaConfig", dtype=torch.float32, num_key_value_heads=kv_heads)
    ids = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    with MemoryTracker("cpu") as mt:
        stats = chunkwise_backward(
            model, ids, schedule=ChunkSchedule(chunk_size=16), options=ChunkOptions(), sequence_group=group
        )
    return {"peak": mt.peak_bytes, "kv_bytes": stats.kv_bytes}
