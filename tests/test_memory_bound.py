"""Memory is bounded by one chunk: at a fixed chunk size, SeCO's peak grows with the sequence only by the KV
cache and its gradients, while plain backprop's grows with every activation."""

from __future__ import annotations

import torch
from tiny import tiny_model

from engine.chunkwise import ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker

LENGTHS = (512, 1024, 2048)
CHUNK = 64
# Beyond K, V, G_K, G_V (1 KiB per token here), the only thing that grows with the sequence is the gradient
# attention's backward hands the cache for one layer's prefix K/V at a time (0.25 KiB per token): 1.25x.
# Measured with the mask-free attention (engine/attention.py): 1.18x, 1.27x. Before it, the chunk's
# [chunk x prefix] additive mask added another 0.25 KiB per token (1.3x, 1.5x); a float mask per layer
# (what SDPA makes from a boolean one) would be 2x, a GQA repeat of K/V 3x.
FACTOR = 1.35


def peaks(attn: str):
    model = tiny_model("LlamaConfig", torch.float32, attn=attn, max_position_embeddings=4096)
    for p in model.parameters():  # weights and their grads exist before the step: not counted
        p.grad = torch.zeros_like(p)
    seco, kv, plain = [], [], []
    for n in LENGTHS:
        ids = torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(n))
        with MemoryTracker("cpu") as t:
            stats = chunkwise_backward(model, ids, schedule=ChunkSchedule(chunk_size=CHUNK))
        seco.append(t.peak_bytes)
        kv.append(stats.kv_bytes)
        with MemoryTracker("cpu") as t:
            model(input_ids=ids, labels=ids).loss.backward()
        plain.append(t.peak_bytes)
    return seco, kv, plain


def growth(xs):
    return [b - a for a, b in zip(xs, xs[1:])]


def test_seco_peak_grows_only_by_kv_and_kv_grads():
    seco, kv, plain = peaks("sdpa")
    for dg, dkv, dp in zip(growth(seco), growth(kv), growth(plain)):
        print(
            f"growth: seco {dg / 2**20:.2f} MiB, KV + KV grads {dkv / 2**20:.2f} MiB, plain {dp / 2**20:.2f} MiB"
        )
        assert dkv <= dg <= FACTOR * dkv
        assert dp >= 4 * dg  # plain backprop keeps every layer's activations of every token
    # And the absolute peak at the longest length stays within a small multiple of K/V + grads.
    assert seco[-1] <= 2.5 * kv[-1]


def test_kv_bytes_are_the_analytic_size():
    model = tiny_model("LlamaConfig", torch.float32)
    stats = chunkwise_backward(model, torch.randint(3, 97, (2, 100)), schedule=ChunkSchedule(chunk_size=32))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2  # batch 2
    assert stats.kv_bytes == per_token * 100 * (4 + 4)  # fp32 K/V + fp32 K/V grads
