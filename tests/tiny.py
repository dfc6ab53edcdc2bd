"""Tiny random models and the plain full-sequence reference, shared by the tests (nothing is downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

VOCAB = 97
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=512,
)


def tiny_model(
    config_cls: str = "LlamaConfig", dtype=torch.float64, attn: str = "sdpa", seed: int = 0, **overrides
):
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(dtype)


def tiny_batch(batch: int = 2, seq: int = 37, seed: int = 1, pad_from: int | None = 30, ignore=(5, 9)):
    """input_ids, labels and a right-padded attention mask, with a -100 span in row 0's labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None and batch > 1:
        mask[1, pad_from:] = 0
        ids[1, pad_from:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if ignore:
        labels[0, ignore[0] : ignore[1]] = -100
    return ids, labels, mask


def live_lora(model, targets, **lora_kw):
    """`model` with LoRA adapters (r 4, alpha 8) on `targets`, their B drawn from N(0, 0.05) with torch's RNG:
    PEFT zero-initialises B, which would leave every adapter's A without gradient."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **lora_kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def reference_grads(model, ids, labels, mask=None):
    """Plain full-sequence backprop; the loss is computed from the logits in the model's own dtype
    (float32 at least), since HF's loss upcasts float64 logits down to float32."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = F.cross_entropy(logits.flatten(0, 1).to(dtype), targets.flatten(), ignore_index=-100)
    loss.backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def grads_of(model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def chunkwise_grads(model, ids, labels=None, mask=None, **kw):
    """One chunk-wise step from cleared gradients (`kw`: schedule=, options=, ...): its ChunkStats and the
    gradients it left."""
    from engine.chunkwise import chunkwise_backward

    model.zero_grad(set_to_none=True)
    stats = chunkwise_backward(model, ids, labels=labels, attention_mask=mask, **kw)
    return stats, grads_of(model)


def chunk_step(model, ids, chunk_size, labels=None, mask=None, **options):
    """chunkwise_backward with ChunkSchedule(chunk_size=chunk_size) and ChunkOptions(**options), adding to
    the gradients the model holds."""
    from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward

    schedule = ChunkSchedule(chunk_size=chunk_size)
    return chunkwise_backward(
        model, ids, labels=labels, attention_mask=mask, schedule=schedule, options=ChunkOptions(**options)
    )


def chunk_grads(model, ids, labels, mask, chunk_size, **options):
    """chunkwise_grads with ChunkSchedule(chunk_size=chunk_size) and ChunkOptions(**options)."""
    from engine.chunkwise import ChunkOptions, ChunkSchedule

    schedule = ChunkSchedule(chunk_size=chunk_size)
    return chunkwise_grads(model, ids, labels, mask, schedule=schedule, options=ChunkOptions(**options))


def hf_assistant_mask(tok, messages, last_only=False, **kwargs):
    """HF's own assistant-token mask of a conversation (`kwargs` to apply_chat_template, e.g. chat_template=);
    with last_only, only its last run of assistant tokens."""
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    if last_only:
        last = max(i for i, m in enumerate(mask) if m)
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        mask = [first <= i <= last for i in range(len(mask))]
    return ids, mask


def rel_error(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    num = sum(((got[n].double() - ref[n].double()) ** 2).sum() for n in ref)
    den = sum((ref[n].double() ** 2).sum() for n in ref)
    return float((num / den).sqrt())


def packed_positions(docs: list[list[int]], seq: int) -> torch.Tensor:
    """position_ids of rows packed with documents of the given lengths (HF's convention: restarting at 0 per
    document); the padding after the last document continues its positions (it opens no document)."""
    pos = torch.zeros(len(docs), seq, dtype=torch.long)
    for b, lengths in enumerate(docs):
        at = 0
        for n in lengths:
            pos[b, at : at + n] = torch.arange(n)
            at += n
        pos[b, at:] = torch.arange(seq - at) + (pos[b, at - 1] + 1)
    return pos


def per_document_grads(model, ids, labels, docs: list[list[int]]):
    """Plain autograd over each packed document alone; CE summed over all documents / all their targets.
    Returns (loss, number of targets, grads)."""
    pieces = []
    for b, lengths in enumerate(docs):
        at = 0
        for n in lengths:
            t = torch.full_like(labels[b : b + 1, at : at + n], -100)
            t[:, :-1] = labels[b : b + 1, at + 1 : at + n]
            pieces.append((ids[b : b + 1, at : at + n], t))
            at += n
    total = sum(int((t != -100).sum()) for _, t in pieces)
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for x, t in pieces:
        logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
        (ce / total).backward()
        loss += ce.item()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return loss / total, total, grads


def event_accumulator():
    """TensorBoard's event reader, or a skip where it cannot import: tensorboard 2.14 (the oldest supported)
    reads events through numpy names that numpy 2 removed (np.string_); writing events is unaffected."""
    import pytest

    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except AttributeError as e:
        pytest.skip(f"this tensorboard's event reader does not import with this numpy: {e}")
    return EventAccumulator
