"""Fused chunked cross-entropy (engine/loss.py): exactly the model's loss and gradient, slice by slice,
with the model's own logits never materialised; a fallback to the whole-chunk loss, logged once."""

from __future__ import annotations

import logging

import pytest
import tiny
import torch
from peft import LoraConfig, get_peft_model
from tiny import chunk_grads, chunk_step, grads_of, reference_grads, rel_error, tiny_batch, tiny_model

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker

# family, attention, config overrides, float64 bound. The bounds are those of the whole-chunk path for the
# same family (tests/test_chunkwise.py): Gemma's norms and eager softmax, Cohere's LayerNorm compute in
# float32 inside float64 models; the fused loss itself adds nothing measurable.
CASES = [
    ("LlamaConfig", "sdpa", {}, 1e-12),
    ("Gemma2Config", "eager", {"head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 3.0}, 1e-6),
    ("CohereConfig", "sdpa", {"logit_scale": 0.5}, 1e-8),
    ("GraniteConfig", "sdpa", {"logits_scaling": 4.0}, 1e-12),
]


def head_inputs(model):
    """Tokens per row the LM head projects during a step (0: the fused path ran)."""
    seen = []
    head = model.get_output_embeddings()
    return seen, head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))


@pytest.mark.parametrize("family,attn,kw,bound", CASES, ids=[c[0] for c in CASES])
def test_fused_loss_is_the_models_loss(family, attn, kw, bound):
    """Softcapping (Gemma-2), logit scaling (Cohere, Granite): loss and gradient as full backprop, with 3
    tokens per slice (slices cross rows and end mid-chunk)."""
    model = tiny_model(family, attn=attn, **kw)
    ids, labels, mask = tiny_batch()
    ref_loss, ref = reference_grads(model, ids, labels, mask)
    seen, hook = head_inputs(model)
    stats, got = chunk_grads(model, ids, labels, mask, 8, fused_loss=True, loss_slice=3)
    hook.remove()
    assert rel_error(got, ref) <= bound
    assert stats.loss == pytest.approx(ref_loss, rel=bound)
    # One 1-token check forward, then every chunk's head sees nothing (pass 1 projects one token per row
    # for chunks pass 2 recomputes): no chunk's logits ever exist.
    assert seen[0] == 1 and set(seen[1:]) <= {0, 1} and 0 in seen


def test_fused_loss_with_lora_and_spaco():
    base = tiny_model("LlamaConfig")
    model = tiny.live_lora(base, ["q_proj", "v_proj"])
    ids, labels, mask = tiny_batch()
    kw = dict(
        labels=labels,
        attention_mask=mask,
        schedule=ChunkSchedule(chunk_size=8, mode="spaco", sample_prob=0.5, selected=[1, 3]),
    )
    model.zero_grad(set_to_none=True)
    plain = chunkwise_backward(model, ids, **kw, options=ChunkOptions(fused_loss=False))
    ref = grads_of(model)
    model.zero_grad(set_to_none=True)
    fused = chunkwise_backward(model, ids, **kw, options=ChunkOptions(fused_loss=True, loss_slice=5))
    assert rel_error(grads_of(model), ref) <= 1e-12
    assert fused.loss == pytest.approx(plain.loss, rel=1e-12)  # unvisited chunks' loss: fused in pass 1


def test_unknown_post_processing_falls_back_logged_once(caplog):
    """A model whose logits are not lm_head(h) (here: a forward hook doubling them) is caught by the
    one-token check: the whole-chunk loss is used, exact, and the reason is logged once."""
    model = tiny_model("LlamaConfig")
    model.register_forward_hook(lambda m, args, out: out.__setitem__("logits", out.logits * 2))
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(model, ids, labels, mask)
    with caplog.at_level(logging.WARNING, logger="engine.loss"):
        for _ in range(2):
            _, got = chunk_grads(model, ids, labels, mask, 8, fused_loss=True)
            assert rel_error(got, ref) <= 1e-12
    assert sum("fused loss" in r.message for r in caplog.records) == 1


def test_lora_on_the_head_falls_back():
    base = tiny_model("LlamaConfig")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(model, ids, labels, mask)
    _, got = chunk_grads(model, ids, labels, mask, 8, fused_loss=True)
    assert rel_error(got, ref) <= 1e-12


def test_fused_loss_lowers_the_chunk_peak():
    """Vocabulary 4096, chunk 128: the whole-chunk path holds the chunk's logits and their log-softmax, then
    their gradient (2 MiB each here, float32); the fused path one slice's. Measured 7.62 -> 2.91 MiB."""
    model = tiny_model("LlamaConfig", torch.float32, vocab_size=4096)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(3, 4096, (1, 512), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for fused in (False, True):
        with MemoryTracker("cpu") as t:
            chunk_step(model, ids, 128, fused_loss=fused, loss_slice=16)
        peaks[fused] = t.peak_bytes
    logits = 128 * 4096 * 4
    print(f"chunk peak: whole-chunk loss {peaks[False] / 2**20:.2f} MiB, fused {peaks[True] / 2**20:.2f} MiB")
    assert peaks[False] - peaks[True] >= 1.5 * logits


@pytest.mark.parametrize("family,kw", [("LlamaConfig", {}), ("CohereConfig", {"logit_scale": 0.5})])
def test_fused_loss_in_bfloat16_is_as_close_as_the_whole_chunk_loss(family, kw):
    """The in-place slice loss (softmax overwriting the logits) in a bf16 model: its gradient is as close
    to float64 backprop of the same weights as the whole-chunk bf16 path's (which is HF's own loss)."""
    ids, labels, mask = tiny_batch()
    model = tiny_model(family, torch.float64, **kw)
    _, ref = reference_grads(model, ids, labels, mask)
    model = model.to(torch.bfloat16)
    errors = {}
    for fused in (False, True):
        _, got = chunk_grads(model, ids, labels, mask, 8, fused_loss=fused)
        errors[fused] = rel_error(got, ref)
    assert errors[True] <= 1.5 * errors[False] + 1e-3, errors
