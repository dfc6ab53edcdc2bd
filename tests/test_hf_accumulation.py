"""ChunkwiseTrainer with gradient_accumulation_steps=2 against the plain transformers Trainer, float64: the
same losses and, at every optimizer step, the same gradients (the Trainer's num_items_in_batch
normalisation over the step's micro-batches of uneven lengths, padding and -100 spans)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, rel_error, tiny_model
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from engine.hf_trainer import ChunkwiseTrainer
from engine.options import ChunkOptions
from engine.schedule import ChunkSchedule

STEPS, MICRO, ACCUM = 3, 2, 2


def samples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(STEPS * MICRO * ACCUM):
        n = int(torch.randint(12, 40, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        labels = ids.clone()
        if i % 3 == 0:
            labels[2 : 2 + n // 3] = -100  # a prompt without loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right padding to the batch's longest row: id 0, label -100, mask 0."""
    n = max(len(b["input_ids"]) for b in batch)
    pad = {"input_ids": 0, "labels": -100}
    out = {k: torch.stack([F.pad(b[k], (0, n - len(b[k])), value=v) for b in batch]) for k, v in pad.items()}
    out["attention_mask"] = torch.stack(
        [F.pad(torch.ones_like(b["input_ids"]), (0, n - len(b["input_ids"]))) for b in batch]
    )
    return out


def float64_loss(outputs, labels, num_items_in_batch=None):
    """HF's causal-LM loss (shifted labels, summed / num_items_in_batch), without its float32 upcast."""
    logits = outputs.logits.double()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return ce / num_items_in_batch


class Recorder(TrainerCallback):
    """Each optimizer step's gradient, and its loss: the sum of its micro-batches' losses (each the
    micro-batch's summed CE / the step's num_items_in_batch), as the Trainer adds them up for logging."""

    def __init__(self):
        self.grads, self.losses, self.micro = [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.grads.append(grads)
        self.losses.append(sum(self.micro))
        self.micro = []


def run(tmp_path, cls, **extra) -> Recorder:
    model = tiny_model()  # float64, the same init for both
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    rec = Recorder()

    class InOrder(cls):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            # ChunkwiseTrainer's float64 loss (it returns a float32 tensor, as the Trainer's log keeps it)
            rec.micro.append(self.last_stats.loss if isinstance(self, ChunkwiseTrainer) else loss.item())
            return loss

    trainer = InOrder(
        model=model, args=args, train_dataset=samples(), data_collator=collate, callbacks=[rec], **extra
    )
    trainer.train()
    return rec


@pytest.mark.parametrize("mode", ["seco", "spaco-q1"])
def test_chunkwise_trainer_accumulates_as_the_plain_trainer(tmp_path, mode):
    kw = {"mode": "spaco", "sample_prob": 1.0} if mode == "spaco-q1" else {}
    ours = run(
        tmp_path / "ours",
        ChunkwiseTrainer,
        schedule=ChunkSchedule(chunk_size=8, **kw),
        options=ChunkOptions(fused_loss=False),
    )
    plain = run(tmp_path / "plain", Trainer, compute_loss_func=float64_loss)
    assert len(ours.grads) == len(plain.grads) == STEPS
    for got, ref in zip(ours.grads, plain.grads, strict=True):
        assert rel_error(got, ref) < 1e-10
    assert ours.losses == pytest.approx(plain.losses, rel=1e-10) and len(ours.losses) == STEPS


def test_chunkwise_trainer_accumulates_as_the_project_trainer_under_deepspeed(tmp_path):
    """The Trainer's own DeepSpeed integration (ZeRO-2) with gradient_accumulation_steps=2 against launch/train.py
    with optim.grad_accum_steps=2 on the same rows, SpaCO draws and AdamW: the same per-step losses."""
    import json
    import subprocess
    import sys

    from one_rank import outputs, train_cmd
    from test_sft_hf import OVERRIDES, REPO, one_rank_env

    accum = [*OVERRIDES, "--optim.grad_accum_steps=2"]
    project = tmp_path / "project"
    project.mkdir()
    args = train_cmd(*accum, *outputs(project))
    done = subprocess.run(args, env=one_rank_env(), cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(x) for x in (project / "log" / "metrics.jsonl").read_text().splitlines()]
    expected = [r["loss"] for r in records]
    worker = [
        sys.executable,
        str(REPO / "tests" / "workers" / "hf_trainer.py"),
        str(tmp_path / "hf"),
        "--deepspeed",
    ]
    done = subprocess.run([*worker, "--", *accum], env=one_rank_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = json.loads(done.stdout.split("LOSSES ")[-1])
    assert len(losses) == len(expected) == 4 and losses == pytest.approx(expected, rel=1e-5)
