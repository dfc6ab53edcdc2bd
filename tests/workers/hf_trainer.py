"""Train with engine.hf_trainer.ChunkwiseTrainer in this process and print the per-step losses as JSON.

Usage: hf_trainer.py OUT_DIR [--deepspeed] -- OVERRIDES... (the launch/train.py overrides of the run to
match). With --deepspeed the Trainer gets a ZeRO-2 ds_config (its own DeepSpeed integration, as
`--deepspeed ds_config.json` gives it); the process group comes from RANK/WORLD_SIZE/MASTER_* in the env.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.data import SequentialSampler
from transformers import TrainingArguments

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.config_load import load_config  # noqa: E402
from engine.data import DataStream, build_dataset, collate, load_tokenizer  # noqa: E402
from engine.hf_trainer import ChunkwiseTrainer  # noqa: E402
from engine.model import build_model, model_vocab_size  # noqa: E402
from engine.schedule import ChunkSchedule  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
    },
}


def train(
    out: Path, overrides: list[str], deepspeed: bool, save_steps: int | None = None, resume: str | None = None
) -> list[float]:
    """The per-step losses of a ChunkwiseTrainer run of the config; `resume`: a checkpoint to continue."""
    cfg = load_config(str(REPO / "configs" / "tiny-cpu.yaml"), overrides, check_paths=False)
    dataset = build_dataset(cfg.data, load_tokenizer(cfg.data.tokenizer), model_vocab_size(cfg.model))
    stream = DataStream(dataset, cfg.data.batch_size, 0, 1, seed=cfg.data.seed)
    steps, accum = cfg.optim.steps, cfg.optim.grad_accum_steps or 1
    samples = [{k: v[0] for k, v in next(stream).items()} for _ in range(steps * accum)]
    model = build_model(cfg.model, seed=cfg.optim.seed)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=cfg.data.batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps or steps,
        report_to=[],
        use_cpu=not deepspeed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        deepspeed=DS_CONFIG if deepspeed else None,
        disable_tqdm=True,
    )
    losses: list[float] = []
    micro: list[float] = []  # the open optimizer step's micro-batch losses (shares of the step's mean)

    class InOrder(ChunkwiseTrainer):
        def _get_train_sampler(self, *a, **kw):
            return SequentialSampler(self.train_dataset)

        def training_step(self, *a, **kw):
            last = self.accelerator.sync_gradients  # this micro-batch ends the optimizer step
            loss = super().training_step(*a, **kw)
            micro.append(self.last_stats.loss)
            if last:
                losses.append(sum(micro))
                micro.clear()
            return loss

    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=collate,
        schedule=ChunkSchedule.from_config(cfg.chunking),
        seed=cfg.optim.seed,
    )
    trainer.train(resume_from_checkpoint=resume)
    return losses


if __name__ == "__main__":
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    ds = "--deepspeed" in rest[: rest.index("--")]
    print("LOSSES " + json.dumps(train(out, rest[rest.index("--") + 1 :], ds)))
