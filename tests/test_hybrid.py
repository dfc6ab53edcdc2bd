"""Hybrid linear-attention / SSM models: chunk-wise gradients against plain full-sequence autograd.

A recurrent layer's conv and recurrent states at each chunk boundary are checkpoints like K/V
(engine/state_cache.py). Every family the installed transformers registers with recurrent layers is either
exact here or refused with a ValueError that names the family and the missing piece.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from tiny import chunk_grads, chunkwise_grads, live_lora, reference_grads, rel_error, tiny_batch
from tiny_hybrid import HYBRIDS, tiny_hybrid
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker
from engine.state_cache import REFUSED, VERIFIED, check_family, has_states

SEQ, CHUNK = 13, 5  # 3 chunks of 5, 5, 3 tokens: the length is not a multiple of the chunk
EXACT = [f for f in HYBRIDS if f in VERIFIED]
# The issue's families (Qwen3.5 dense and MoE, Qwen3-Next, Kimi-Linear, OLMo-hybrid, MiniMax, Falcon-H1, Bamba,
# Granite-4 hybrid, Jamba, Nemotron-H, Mamba, Mamba2, Falcon-Mamba): each must be exact or refused.
ISSUE_FAMILIES = (
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "qwen3_next",
    "kimi_linear",
    "olmo_hybrid",
    "minimax",
    "falcon_h1",
    "bamba",
    "granitemoehybrid",
    "jamba",
    "nemotron_h",
    "mamba",
    "mamba2",
    "falcon_mamba",
)
# One of each kind of mixer: gated delta rule (conv + delta state), KDA (its single-token conv kernel writes
# the conv state in place), attention + Mamba-2 in one layer, Mamba-2 without attention, short conv only.
KINDS = ("qwen3_5_text", "kimi_linear", "falcon_h1", "mamba2", "lfm2")


def tol(model) -> float:
    """float64: HF's torch kernels of these mixers compute in float32 even in float64 models (the gated delta
    rule casts q/k/v/g/beta `.to(torch.float32)`, the Mamba-2 scan `hidden_states.float()`, its decode step
    `dt.float() * A.float()`), and float32 rounds a scan restarted at chunk boundaries differently from one
    pass: 1e-6 there (measured 1e-13 .. 3e-7). Where HF stays in float64 the bound is 1e-10 (LFM2's short
    convolutions: measured 2e-16). float32 models: 1e-5."""
    if next(model.parameters()).dtype != torch.float64:
        return 1e-5
    return 1e-10 if model.config.model_type == "lfm2" else 1e-6


@pytest.fixture(autouse=True)
def _no_onednn():
    # Test speed only: oneDNN's float64 depthwise conv1d re-plans for every new shape (seconds each on a busy
    # box); the reference and the chunk-wise run use the same kernels either way.
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def batch(seq: int = SEQ):
    # batch 2, row 1 right-padded from 11, a -100 span in row 0's labels
    return tiny_batch(seq=seq, pad_from=seq - 2, ignore=(3, 5))


def check_exact(model, chunk_size, seq: int = SEQ):
    ids, labels, mask = batch(seq)
    ref_loss, ref = reference_grads(model, ids, labels, mask)
    stats, got = chunkwise_grads(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=chunk_size))
    err = rel_error(got, ref)
    print(
        f"{model.config.model_type} {next(model.parameters()).dtype} chunk {chunk_size}: rel error {err:.1e}"
    )
    assert stats.num_chunks == -(-seq // chunk_size)
    assert err <= tol(model)
    assert stats.loss == pytest.approx(ref_loss, rel=1e-6)
    return stats


def _registered_recurrent_families() -> dict:
    """model_type -> default text config, for the installed causal-LM registry's families with recurrent
    layers (by their default config) or on the refused list."""
    found = {}
    for family in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            cfg = getattr(transformers, CONFIG_MAPPING_NAMES[family])()
            cfg = cfg.get_text_config(decoder=True)
        except Exception:  # a config that cannot be built with defaults is not one we could train
            continue
        if family in REFUSED or has_states(cfg):
            found[family] = cfg
    return found


@pytest.mark.parametrize("family", list(HYBRIDS))
def test_registry_family_is_exact_or_refused(family):
    """float64, batch 2, right padding, a -100 span, 13 tokens in chunks of 5."""
    assert family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model = tiny_hybrid(family)
    if family not in VERIFIED:
        ids, labels, mask = batch()
        with pytest.raises(ValueError, match=family):
            chunkwise_backward(
                model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=CHUNK)
            )
        return
    check_exact(model, CHUNK)


def test_registry_walk_covers_every_recurrent_family():
    """Every registered recurrent family is run above, or its config alone is refused with its name."""
    assert set(ISSUE_FAMILIES) <= set(HYBRIDS)
    registered = _registered_recurrent_families()
    assert set(ISSUE_FAMILIES) - {"mamba", "falcon_mamba"} <= set(registered)  # (no layer_types there)
    refused = []
    for family, cfg in registered.items():
        if cfg.model_type in HYBRIDS:  # e.g. qwen3_5's text model qwen3_5_text
            continue
        with pytest.raises(ValueError, match=cfg.model_type):
            check_family(cfg)
        refused.append(family)
    print("refused by their config alone:", refused)


def test_refused_without_the_cache_api():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.RwkvConfig(hidden_size=32, num_hidden_layers=2, vocab_size=97, attention_hidden_size=32)
    )
    ids, labels, mask = batch()
    with pytest.raises(ValueError, match="rwkv: .*Cache"):
        chunkwise_backward(
            model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=CHUNK)
        )


@pytest.mark.parametrize(
    "family",
    [  # qwen3_next (MoE + delta rule, the slowest here) is checked in float64 above
        "olmo_hybrid",
        "qwen3_5_text",
        "kimi_linear",
        "falcon_h1",
        "granitemoehybrid",
        "nemotron_h",
        "bamba",
        "mamba2",
    ],
)
def test_float32(family):
    check_exact(tiny_hybrid(family, torch.float32), CHUNK)


@pytest.mark.parametrize("chunk_size", [1, SEQ], ids=["chunk1", "one_chunk"])
@pytest.mark.parametrize("family", KINDS)
def test_chunk_of_one_token_and_one_chunk(family, chunk_size):
    """Chunk 1 runs every recurrent layer through its single-token decode path (Mamba-2's updates the state
    in place, KDA's the conv state); one chunk is plain backprop through the cache."""
    check_exact(tiny_hybrid(family), chunk_size, seq=7 if chunk_size == 1 else SEQ)


LORA_TARGETS = {
    "qwen3_5_text": ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "v_proj"],
    # PEFT refuses LoRA on Mamba mixers' out_proj and conv1d
    "falcon_h1": ["in_proj", "q_proj", "v_proj"],
    "mamba2": ["in_proj"],
    "qwen3_next": ["in_proj_qkvz", "in_proj_ba", "q_proj", "v_proj"],
    "olmo_hybrid": ["a_proj", "b_proj", "g_proj", "q_proj", "v_proj"],
    "kimi_linear": ["b_proj", "g_a_proj", "q_proj", "v_proj"],
    "bamba": ["in_proj", "q_proj", "v_proj"],
    "granitemoehybrid": ["in_proj", "q_proj", "v_proj"],
    "nemotron_h": ["in_proj", "q_proj", "v_proj"],
}


@pytest.mark.parametrize("family", list(LORA_TARGETS))
def test_lora(family):
    model = live_lora(tiny_hybrid(family), LORA_TARGETS[family])
    ids, labels, mask = batch()
    _, ref = reference_grads(model, ids, labels, mask)
    assert ref and all("lora_" in n for n in ref)
    _, got = chunkwise_grads(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=CHUNK))
    assert rel_error(got, ref) <= tol(model.get_base_model())


def test_spaco_exact_enumeration_on_a_hybrid():
    """Nemotron-H (Mamba-2, attention, Mamba-2, MLP): over all 2^3 Bernoulli selections weighted by their
    probability, SpaCO's estimate averages to SeCO's gradient: paths through state hops and K/V alike carry
    one 1/q per chunk. Without the weights the same average is off."""
    model = tiny_hybrid("nemotron_h")
    ids, labels, mask = tiny_batch(seq=9, pad_from=8, ignore=(2, 4))
    k, q = 3, 0.5
    _, seco = chunkwise_grads(model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=3))
    total, uncompensated = {}, {}
    for bits in itertools.product([0, 1], repeat=k):
        sel = [c for c in range(k) if bits[c]]
        p = q ** len(sel) * (1 - q) ** (k - len(sel))
        for acc, cap in ((total, None), (uncompensated, 1.0)):
            _, g = chunkwise_grads(
                model,
                ids,
                labels,
                mask,
                schedule=ChunkSchedule(
                    chunk_size=3, mode="spaco", selected=sel, sample_prob=q, compensation_cap=cap
                ),
            )
            for n, p_ in model.named_parameters():
                acc[n] = acc.get(n, 0) + p * g.get(n, torch.zeros_like(p_))
    assert rel_error(total, seco) <= 1e-6  # float32 inside the Mamba-2 kernels, see tol()
    assert rel_error(uncompensated, seco) > 0.1


def test_packed_documents_are_refused():
    model = tiny_hybrid("mamba2")
    ids, labels, mask = batch()
    pos = torch.cat([torch.arange(6), torch.arange(SEQ - 6)]).expand(2, -1)
    with pytest.raises(ValueError, match="mamba2: packed documents"):
        chunkwise_backward(
            model, ids, labels=labels, position_ids=pos, schedule=ChunkSchedule(chunk_size=CHUNK)
        )


LENGTHS, MEM_CHUNK = (128, 256, 512), 32


def test_pure_recurrent_memory_does_not_grow_beyond_state_checkpoints():
    """At a fixed chunk size, a Mamba-2 step's peak grows with the sequence only by the boundary states
    (O(k) small tensors) and the per-token integer inputs; plain backprop grows with every activation."""
    model = tiny_hybrid("mamba2", torch.float32, num_hidden_layers=2)
    for p in model.parameters():  # weights and their grads exist before the step: not counted
        p.grad = torch.zeros_like(p)
    seco, states, plain = [], [], []
    for n in LENGTHS:
        ids = torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(n))
        with MemoryTracker("cpu") as t:
            stats = chunkwise_backward(model, ids, schedule=ChunkSchedule(chunk_size=MEM_CHUNK))
        seco.append(t.peak_bytes)
        states.append(stats.kv_bytes)
        with MemoryTracker("cpu") as t:
            model(input_ids=ids, labels=ids).loss.backward()
        plain.append(t.peak_bytes)
    per_boundary = states[0] / (LENGTHS[0] // MEM_CHUNK - 1)
    for i in range(1, len(LENGTHS)):
        d_seco, d_states, d_plain = seco[i] - seco[i - 1], states[i] - states[i - 1], plain[i] - plain[i - 1]
        d_tokens = LENGTHS[i] - LENGTHS[i - 1]
        print(f"+{d_tokens} tokens: seco +{d_seco} B, states +{d_states} B, plain +{d_plain} B")
        assert d_states == per_boundary * d_tokens // MEM_CHUNK  # O(1) bytes per boundary
        # ids, labels, targets, position ids, mask: a few int64 per token; nothing per token per layer
        assert d_seco <= d_states + 64 * d_tokens
        assert d_plain >= 10 * d_seco


def test_kv_offload_with_recurrent_layers():
    """Host-resident K/V of the attention layers next to device-resident states; the last chunk (one token)
    puts the decode kernels' in-place state writes under the offload's saved-tensor hooks."""
    model = tiny_hybrid("falcon_h1")
    ids, labels, mask = batch(seq=7)
    _, ref = reference_grads(model, ids, labels, mask)
    _, got = chunkwise_grads(
        model, ids, labels, mask, schedule=ChunkSchedule(chunk_size=2), options=ChunkOptions(offload_kv=True)
    )  # 2 + 2 + 2 + 1
    assert rel_error(got, ref) <= tol(model)


def test_checkpoint_layers_with_recurrent_layers():
    """Layers recomputed in backward get the entering state again (a fresh copy per call), not the state the
    forward wrote; single-token chunks, whose kernels write in place also in the recompute, are refused."""
    model = tiny_hybrid("falcon_h1")
    ids, labels, mask = batch(seq=7)
    _, ref = reference_grads(model, ids, labels, mask)
    _, got = chunk_grads(model, ids, labels, mask, 3, checkpoint_layers=True)
    assert rel_error(got, ref) <= tol(model)
    with pytest.raises(ValueError, match="falcon_h1: checkpoint_layers with chunk_size 1"):
        chunkwise_backward(
            model,
            ids,
            labels=labels,
            attention_mask=mask,
            schedule=ChunkSchedule(chunk_size=1),
            options=ChunkOptions(checkpoint_layers=True),
        )
