"""The model of a run config with trained weights, for evaluation in one process (python -m engine.evaluate).

checkpoint   a checkpoint.dir (its `latest`) or one global_stepN inside it: the config's model (+ LoRA)
             built, then the checkpoint's weights loaded. Without ZeRO-3 they are the model states file's
             full copy; under ZeRO-3 DeepSpeed's zero_to_fp32 consolidates the shards in host memory
                 (in float32: a float64 run's weights come back rounded).
             Every file passes the weights-only check first (engine/safe_load.py).
model_dir    an export: a full HF model (checkpoint.export hf) or a PEFT adapter (export lora, put on the
             config's base model)
neither      the config's model as it is (a local model directory, or its random init)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from engine.config import Config
from engine.model import DTYPES, apply_lora, build_model
from engine.safe_load import CheckpointError, load_file

ZERO3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def model_for_eval(cfg: Config, checkpoint: str | None = None, model_dir: str | None = None):
    if checkpoint is not None and model_dir is not None:
        raise ValueError("give at most one of --checkpoint and --model")
    if model_dir is not None:
        return _from_export(cfg, Path(model_dir))
    model = apply_lora(build_model(cfg.model, seed=cfg.optim.seed), cfg.lora)
    if checkpoint is not None:
        try:
            model.load_state_dict(_checkpoint_state(cfg, checkpoint))
        except RuntimeError as e:  # missing / unexpected keys, other shapes: another model or lora section
            first = str(e).strip().splitlines()[0][:300]
            raise ValueError(
                f"--checkpoint: its weights do not fit the model of --config (model / lora sections as in the "
                f"run that wrote it?): {first}"
            ) from None
    return model


def _from_export(cfg: Config, path: Path):
    if not path.is_dir():
        raise ValueError(f"--model: {str(path)!r} is not a directory (an export: HF model or LoRA adapter)")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(build_model(cfg.model, seed=cfg.optim.seed), str(path))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path),
        local_files_only=True,
        dtype=DTYPES[cfg.model.dtype],
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def _checkpoint_state(cfg: Config, path: str) -> dict[str, torch.Tensor]:
    from engine.checkpoint import find_resume, model_states_file, verify

    found = find_resume(dataclasses.replace(cfg.checkpoint, dir=path, resume=path))
    assert found is not None  # find_resume raises when there is no checkpoint at an explicit path
    load_dir, tag = found
    tag_dir = Path(load_dir) / tag
    meta = load_file(model_states_file(tag_dir), mmap=True)
    if not isinstance(meta, dict) or not isinstance(meta.get("seco"), dict):
        raise CheckpointError(f"--checkpoint: {str(tag_dir)!r} was not written by this engine")
    verify(load_dir, tag, meta.get("dp_world_size"))  # every file weights-only loadable, before zero_to_fp32
    if (tag_dir / ZERO3_STATES).is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(load_dir, tag=tag)
    else:
        state = meta["module"]
    dtype = DTYPES[cfg.model.dtype]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
