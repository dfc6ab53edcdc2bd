"""The chunk attention (engine/attention.py): lower-right causal without a mask, grouped K/V, registered once
with transformers and selected per step on the model's own config, leaving nothing process-wide changed."""

from __future__ import annotations

import os
import warnings

import deepspeed  # noqa: F401  (imported up front: its import sets PYTORCH_NVML_BASED_CUDA_CHECK, once)
import pytest
import torch
import torch.nn.functional as F
from tiny import reference_grads, rel_error, tiny_batch, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from engine import attention
from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


@pytest.mark.parametrize("n,total", [(5, 13), (1, 9), (8, 8), (3, 40)])
def test_lower_right_causal_matches_an_explicit_mask(n, total):
    """Against SDPA with an explicit bottom-right mask and repeated heads, in float64, values and grads.
    The top-left alignment (the mistake to catch) differs, so this test can fail."""
    g = torch.Generator().manual_seed(n * total)
    q = torch.randn(2, 4, n, 16, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, total, 16, dtype=torch.float64, generator=g) for _ in range(2))
    grad = torch.randn(2, 4, n, 16, dtype=torch.float64, generator=g)
    bottom_right = torch.ones(n, total, dtype=torch.bool).tril(total - n)

    def reference(mask):
        return lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
        )

    got = _grads(attention.lower_right_causal, q, k, v, grad)
    ref = _grads(reference(bottom_right), q, k, v, grad)
    for a, b in zip(got, ref):
        assert (a - b).norm() <= 1e-12 * b.norm()
    if n < total:
        wrong = _grads(reference(torch.ones(n, total, dtype=torch.bool).tril()), q, k, v, grad)
        assert (wrong[0] - ref[0]).norm() > 1e-3 * ref[0].norm()


def _snapshot(model):
    return (
        dict(os.environ),
        dict(AttentionInterface._global_mapping),
        dict(AttentionMaskInterface._global_mapping),
        dict(ALL_ATTENTION_FUNCTIONS._local_mapping),
        dict(ALL_MASK_ATTENTION_FUNCTIONS._local_mapping),
        model.config._attn_implementation,
    )


@pytest.mark.parametrize(
    "family,kw",
    [
        ("LlamaConfig", {}),
        (
            "Gemma3TextConfig",
            {"head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
        ),
        ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    ],
)
def test_full_layers_run_unmasked_and_nothing_process_wide_changes(family, kw, monkeypatch):
    """During the step full-attention layers go through the mask-free kernel with grouped K/V (sliding ones
    keep their mask); after it, os.environ, transformers' attention and mask registries and the model's
    attention implementation are what they were before; and the gradient is exact (float64)."""
    model = tiny_model(family, **kw)
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(model, ids, labels, mask)
    seen, real = [], attention.lower_right_causal

    def spy(q, k, v, **kwargs):
        seen.append((model.config._attn_implementation, q.shape[1], k.shape[1]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "lower_right_causal", spy)
    before = _snapshot(model)
    model.zero_grad(set_to_none=True)
    chunkwise_backward(model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=8))
    assert _snapshot(model) == before
    full = sum(
        t == "full_attention" for t in getattr(model.config, "layer_types", None) or ["full_attention"] * 2
    )
    assert len(seen) == 2 * 5 * full  # two passes, five chunks, every full-attention layer
    assert all(impl == attention.ATTENTION and (h, hk) == (4, 2) for impl, h, hk in seen)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # Gemma's norms compute in float32 even in float64 models (HF's code), which rounds the chunked and the
    # full forward's (1e-16 apart) inputs apart now and then: measured 2e-9 there, ~3e-16 elsewhere.
    assert rel_error(got, ref) <= (1e-8 if family.startswith("Gemma") else 1e-12)


def test_a_chunk_step_raises_no_future_warnings():
    """transformers 5.24 deprecates `past_key_values` (the models' forward takes `cache`): none is left."""
    model = tiny_model("LlamaConfig")
    ids, labels, mask = tiny_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        chunkwise_backward(
            model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=8)
        )
        chunkwise_backward(  # and with every memory option
            model.train(),
            ids,
            labels=labels,
            attention_mask=mask,
            schedule=ChunkSchedule(chunk_size=8),
            options=ChunkOptions(
                checkpoint_layers=True, fused_loss=True, offload_kv="auto", kv_device_budget=0
            ),
        )


def test_models_not_on_sdpa_keep_their_attention():
    model = tiny_model("LlamaConfig", attn="eager")
    with attention.chunk_attention(model.config) as name:
        assert name == "eager" and model.config._attn_implementation == "eager"
    model = tiny_model("LlamaConfig")
    with attention.chunk_attention(model.config) as name:
        assert name == model.config._attn_implementation == attention.ATTENTION
    assert model.config._attn_implementation == "sdpa"
