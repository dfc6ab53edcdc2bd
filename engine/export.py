"""Export at the end of training: the LoRA adapter (PEFT format) or the full model (HF format, LoRA merged)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpoint import TMP_PREFIX, verify
from engine.config import CheckpointConfig
from engine.distributed.runtime import any_rank
from engine.safe_paths import UnsafePath, entry, is_real_dir
from engine.unwrap import base_model


def export(engine, ckpt_cfg: CheckpointConfig, tag: str, tokenizer) -> str | None:
    """Write checkpoint.dir/export at the end of training (every rank must call it); returns its path.

    lora: the adapter in PEFT format (PeftModel.from_pretrained); hf: the full model, LoRA merged in, in HF
    format (AutoModelForCausalLM.from_pretrained), plus the tokenizer when it is an HF one. Under ZeRO-3 the
    weights come from the checkpoint `tag` just saved, consolidated on rank 0 by DeepSpeed's zero_to_fp32
    (host memory, no GPU gather); otherwise from rank 0's own (full) copy. Written to export.tmp, then renamed.
    """
    if ckpt_cfg.export == "none":
        return None
    root = Path(ckpt_cfg.dir)
    out, tmp = root / "export", root / (TMP_PREFIX + "export")
    zero3 = engine.zero_optimization_stage() == 3
    refused = _refused(root) if dist.get_rank() == 0 else None
    if any_rank(refused is not None):
        raise UnsafePath(f"export not written: {refused or 'rank 0 refused its directory'}")
    if dist.get_rank() == 0:
        if is_real_dir(tmp):  # this engine's own leftover (an export a crash interrupted)
            shutil.rmtree(tmp)
        model = engine.module
        if zero3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # zero_to_fp32 unpickles with weights_only=False: its input passes the weights-only check first
            # (the files this run just wrote, so this only guards against a swap in between).
            verify(str(root), tag, dist.get_world_size())
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if ckpt_cfg.export == "lora":
            _save_adapter(model, state, tmp)
        else:
            _save_full(model, state, tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    dist.barrier()
    return str(out)


def _refused(root: Path) -> str | None:
    """Neither export/ nor tmp.export may be a symbolic link: save_pretrained would write through it."""
    try:
        for name in ("export", TMP_PREFIX + "export"):
            entry(root, name, "checkpoint.dir")
    except UnsafePath as e:
        return str(e)
    return None


def _save_adapter(model, state: dict[str, torch.Tensor], out: Path) -> None:
    from peft import get_peft_model_state_dict

    # PEFT picks the adapter's tensors out of a full state dict; passing it explicitly also covers ZeRO-3,
    # where the module's own parameters are empty partitions.
    adapter = get_peft_model_state_dict(model, state_dict=state)
    model.save_pretrained(str(out), state_dict=adapter)


def _save_full(model, state: dict[str, torch.Tensor], out: Path) -> None:
    base = base_model(model)
    if hasattr(model, "peft_config"):
        state = merge_lora(state, model.peft_config["default"])
    dtype = next(iter(base.parameters())).dtype  # the trained dtype, not zero_to_fp32's float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    base.save_pretrained(str(out), state_dict=state)


def merge_lora(state: dict[str, torch.Tensor], peft_cfg) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's state dict -> the plain model's, with W + (alpha / r) B A merged in.

    Done on the state dict rather than with PEFT's merge_and_unload so that it also applies to weights
    consolidated from a ZeRO-3 checkpoint, where there is no whole model to merge into.
    """
    scale = peft_cfg.lora_alpha / (peft_cfg.r**0.5 if peft_cfg.use_rslora else peft_cfg.r)
    prefix = "base_model.model."
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.removeprefix(prefix)
        if ".base_layer." in key:
            module = key.rsplit(".base_layer.", 1)[0]
            a, b = state.get(f"{module}.lora_A.default.weight"), state.get(f"{module}.lora_B.default.weight")
            if key.endswith(".base_layer.weight") and a is not None:
                delta = scale * (b.double() @ a.double())
                delta = delta.T if peft_cfg.fan_in_fan_out else delta  # GPT-2 style Conv1D weights
                value = (value.double() + delta).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        merged[name] = value
    return merged
