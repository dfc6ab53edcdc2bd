"""A model with transformers' gradient checkpointing enabled: chunk-wise steps stay exact (transformers' own
checkpointing drops the cache in every layer, so each chunk would see no prefix), and the model's
checkpointing flags are as the user left them after the step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny import chunk_grads, grads_of, live_lora, reference_grads, rel_error, tiny_batch, tiny_model

from engine.chunkwise import ChunkSchedule, chunkwise_backward
from engine.layer_checkpoint import hf_checkpointing_taken_over  # noqa


def _flags(model) -> list[bool]:
    return [bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules()]


def _step(model, ids, labels, mask, **options):
    return chunk_grads(model, ids, labels, mask, 8, **options)


def test_hf_gradient_checkpointing_is_exact_and_restored():
    model = tiny_model("LlamaConfig").train()
    ids, labels, mask = tiny_batch()
    loss, ref = reference_grads(model, ids, labels, mask)
    model.gradient_checkpointing_enable()
    before = _flags(model)
    assert any(before)
    stats, got = _step(model, ids, labels, mask)
    assert rel_error(got, ref) <= 1e-12
    assert abs(stats.loss - loss) <= 1e-12
    assert _flags(model) == before  # the user's setting is back after the step
    assert "forward" not in vars(model.model.layers[0])  # and ours is gone
    model.gradient_checkpointing_disable()
    assert not any(_flags(model))


def test_hf_gradient_checkpointing_on_a_lora_model_is_exact():
    """PEFT: the flags sit on the wrapped base model's modules."""
    model = live_lora(tiny_model("LlamaConfig"), ["q_proj", "v_proj"]).train()
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(model, ids, labels, mask)
    model.gradient_checkpointing_enable()
    assert any(_flags(model.get_base_model()))
    for fused in (False, True):
        _, got = _step(model, ids, labels, mask, fused_loss=fused)
        assert rel_error(got, ref) <= 1e-12


def test_without_the_takeover_the_dropped_cache_is_refused(monkeypatch):
    """Negative control: transformers' checkpointing left on drops the cache in every layer. The check that
    every attention layer wrote its K/V in each chunk refuses the step; with that check off too, the gradient
    is wrong (each chunk without its prefix: the error the takeover avoids)."""
    import engine.chunkwise
    from engine.kv_cache import ChunkKVCache

    model = tiny_model("LlamaConfig").train()
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(model, ids, labels, mask)
    model.gradient_checkpointing_enable()
    monkeypatch.setattr(
        engine.chunkwise, "hf_checkpointing_taken_over", lambda m: contextlib.nullcontext(False)
    )
    with pytest.raises(
        ValueError,
        match=r"decoder layers \[0, 1\] ran chunk 4 without the chunk-wise K/V cache .* chunking\.checkpoint_layers",
    ):
        _step(model, ids, labels, mask)
    monkeypatch.setattr(ChunkKVCache, "check_written", lambda self, chunk: None)
    _, got = _step(model, ids, labels, mask)
    assert rel_error(got, ref) > 0.1


def test_flags_restored_when_the_step_raises():
    model = tiny_model("LlamaConfig").train()
    model.gradient_checkpointing_enable()
    before = _flags(model)
    try:
        with hf_checkpointing_taken_over(model) as was_on:
            assert was_on and not any(_flags(model))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _flags(model) == before
    with hf_checkpointing_taken_over(tiny_model("LlamaConfig")) as was_on:
        assert not was_on


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids, labels, mask):
        self.rows = list(zip(ids, labels, mask))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, labels, mask = self.rows[i]
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _trainer_grads(tmp_path, gradient_checkpointing: bool):
    """The gradient of the first step of ChunkwiseTrainer (seen before the optimizer step)."""
    from transformers import TrainerCallback, TrainingArguments

    from engine.hf_trainer import ChunkwiseTrainer

    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen.setdefault("grads", grads_of(trainer.model))
            seen.setdefault("flags", _flags(trainer.model))

    model = tiny_model("LlamaConfig")
    args = TrainingArguments(
        output_dir=str(tmp_path / f"gc{gradient_checkpointing}"),
        per_device_train_batch_size=2,
        max_steps=1,
        max_grad_norm=0.0,
        gradient_checkpointing=gradient_checkpointing,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_drop_last=True,
    )
    trainer = ChunkwiseTrainer(
        model=model,
        args=args,
        train_dataset=_Rows(*tiny_batch()),
        data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
        schedule=ChunkSchedule(chunk_size=8),
        callbacks=[Grab()],
    )
    trainer.train()
    return seen


def test_chunkwise_trainer_with_gradient_checkpointing_is_exact(tmp_path):
    """TrainingArguments(gradient_checkpointing=True) makes the Trainer enable transformers' checkpointing
    on the model: the step's gradient equals full backprop's all the same."""
    ids, labels, mask = tiny_batch()
    _, ref = reference_grads(tiny_model("LlamaConfig").train(), ids, labels, mask)
    with_gc = _trainer_grads(tmp_path, True)
    assert any(with_gc["flags"])  # the Trainer did enable it, and the step left it enabled
    assert rel_error(with_gc["grads"], ref) <= 1e-12


def test_hf_gradient_checkpointing_under_a_spaco_draw_with_dropout():
    """A SpaCO selection in train mode with dropout: the same gradient as without transformers'
    checkpointing (the recompute replays the forward's dropout masks), the RNG continuing alike."""
    from engine.schedule import ChunkSchedule

    model = tiny_model("LlamaConfig", attention_dropout=0.2).train()
    ids, labels, mask = tiny_batch()
    schedule = ChunkSchedule(chunk_size=8, mode="spaco", sample_prob=0.5, selected=(0, 2, 4))
    runs = []
    for enabled in (False, True):
        if enabled:
            model.gradient_checkpointing_enable()
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        chunkwise_backward(model, ids, labels=labels, attention_mask=mask, schedule=schedule)
        runs.append((grads_of(model), torch.rand(1)))
    (plain, after_plain), (taken_over, after_taken_over) = runs
    assert rel_error(taken_over, plain) <= 1e-12 and torch.equal(after_plain, after_taken_over)
