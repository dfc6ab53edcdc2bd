"""ChunkwiseTrainer.evaluate: the loss chunk-wise (prediction_step) equals the plain Trainer's (float64)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_batch, tiny_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from engine.hf_trainer import ChunkwiseTrainer
from engine.schedule import ChunkSchedule


class Rows(Dataset):
    """5 rows of 37 tokens: right padding and a -100 span, batches of 2 (the last one holds 1 row)."""

    def __init__(self):
        ids, labels, mask = tiny_batch(batch=5, seq=37, seed=3)
        mask[3, 20:] = 0
        ids[3, 20:] = 0
        labels[3, 20:] = -100
        self.rows = [
            {"input_ids": i, "labels": lab, "attention_mask": m} for i, lab, m in zip(ids, labels, mask)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize("chunk", [8, 37])
def test_chunkwise_eval_loss_equals_the_plain_trainers(tmp_path, chunk, monkeypatch):
    import engine.hf_trainer

    calls = []
    real = engine.hf_trainer.score
    monkeypatch.setattr(
        engine.hf_trainer, "score", lambda *a, **k: calls.append(k["chunk_size"]) or real(*a, **k)
    )

    def eval_loss(cls, **extra):
        model = tiny_model("LlamaConfig", torch.float64)
        args = TrainingArguments(
            output_dir=str(tmp_path / cls.__name__), per_device_eval_batch_size=2, report_to=[], use_cpu=True
        )
        return cls(model=model, args=args, eval_dataset=Rows(), **extra).evaluate()["eval_loss"]

    plain = eval_loss(Trainer)
    chunked = eval_loss(ChunkwiseTrainer, schedule=ChunkSchedule(chunk_size=chunk))
    # HF's loss is computed from float32-cast logits; ours keeps float64: equal to float32's precision.
    assert chunked == pytest.approx(plain, rel=1e-6)
    assert plain > 4.0  # a random model over 97 tokens: ~ln(97)
    assert len(calls) == 3 and calls[0] == chunk  # 3 batches, each scored chunk-wise


@pytest.mark.parametrize(
    ("name", "kwargs"), [("sp_size", {"sp_size": 2, "sp_backend": "deepspeed"}), ("cp_size", {"cp_size": 2})]
)
def test_sequence_sharding_is_refused_before_any_process_group(tmp_path, name, kwargs):
    """accelerate's sequence (ALST) and context parallelism give each rank a slice of every sequence, which
    chunk-wise backprop would train on as if it were the sequence: refused by name, no group joined."""
    import torch.distributed as dist
    from accelerate.parallelism_config import ParallelismConfig

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], parallelism_config=ParallelismConfig(**kwargs)
    )
    with pytest.raises(ValueError, match=f"parallelism_config.{name}=2 splits every sequence"):
        ChunkwiseTrainer(model=tiny_model(), args=args, train_dataset=Rows(), schedule=ChunkSchedule(8))
    assert not dist.is_initialized()


@pytest.mark.parametrize("zero3", [True, False])
def test_moe_blocks_are_zero3_leaves_under_zero3(tmp_path, monkeypatch, zero3):
    """Under ZeRO-3 (the Trainer's DeepSpeed config) the MoE blocks are fetched whole (engine/zero3_leaves.py),
    flagged before accelerate hands the model to DeepSpeed; without ZeRO-3 nothing is flagged."""
    from deepspeed.utils import z3_leaf_module

    import engine.hf_trainer

    monkeypatch.setattr(engine.hf_trainer, "is_deepspeed_zero3_enabled", lambda: zero3)
    model = tiny_model("MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    ChunkwiseTrainer(model=model, args=args, train_dataset=Rows(), schedule=ChunkSchedule(8))
    blocks = [m for m in model.modules() if type(m).__name__ == "MixtralSparseMoeBlock"]
    assert blocks and all(z3_leaf_module(b) == zero3 for b in blocks)
