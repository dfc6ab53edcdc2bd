"""Checkpoints: atomic save, exact resume, export.

Layout of checkpoint.dir:

    latest                  tag of the newest complete checkpoint (DeepSpeed's convention; written last)
    global_step20/          DeepSpeed's files (model states with our client state, ZeRO optimizer shards)
                            + rng_rank{r}.pt: each rank's RNG states (DeepSpeed keeps rank 0's client state only)
    tmp.global_step40/      a save in progress (or one a crash interrupted): never read, removed by the next save
    zero_to_fp32.py         DeepSpeed's offline consolidation script
    export/                 written at the end when checkpoint.export is lora or hf

A save writes into tmp.<tag>, and only once every rank has finished is it renamed to <tag> and `latest`
replaced (write + os.replace): a crash at any point leaves the previous checkpoint and `latest` intact, and
every directory named global_step* is complete by construction.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import CheckpointConfig

TAG_RE = re.compile(r"^global_step(\d+)$")
TMP_PREFIX = "tmp."
LATEST = "latest"
# Test hook (tests/test_train_e2e.py): raise inside the save of this step, after the temporary checkpoint
# is written and before it is committed, to show that a crash mid-save leaves the previous one loadable.
CRASH_HOOK = "SECO_TEST_CRASH_IN_SAVE"


def tag_for(step: int) -> str:
    return f"global_step{step}"


# ------------------------------------------------------------------------------------------------ resume


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def _newest_complete(root: Path) -> str | None:
    steps = [int(m.group(1)) for p in root.iterdir() if (m := TAG_RE.match(p.name)) and _is_tag_dir(p)]
    return tag_for(max(steps)) if steps else None


def find_resume(ckpt_cfg: CheckpointConfig) -> tuple[str, str] | None:
    """(load_dir, tag) of the checkpoint to resume from, or None for a fresh start. Runs before any process
    group exists, so a bad path is a user error (ValueError) and not a hang.

    resume: auto    the newest checkpoint in checkpoint.dir if there is one (a requeued job picks up its own)
    resume: PATH    a checkpoint directory (with `latest`) or one tag directory inside it; no checkpoint there
                    is an error: the user asked for one
    """
    if ckpt_cfg.resume is None:
        return None
    if ckpt_cfg.resume == "auto":
        root = Path(ckpt_cfg.dir)
        if not root.is_dir():
            return None
        tag = _read_latest(root)
        # `latest` can only be missing or stale after manual deletion; tag directories are complete anyway.
        if tag is None or not _is_tag_dir(root / tag):
            tag = _newest_complete(root)
        return None if tag is None else (str(root), tag)
    path = Path(ckpt_cfg.resume)
    if _is_tag_dir(path):
        return str(path.parent), path.name
    if path.is_dir():
        tag = _read_latest(path)
        if tag is not None and _is_tag_dir(path / tag):
            return str(path), tag
        if tag is not None:
            raise ValueError(f"checkpoint.resume: {str(path)!r}: 'latest' names {tag!r}, which is not there")
        tag = _newest_complete(path)
        if tag is not None:
            return str(path), tag
    raise ValueError(
        f"checkpoint.resume: {str(path)!r} holds no checkpoint (expected a checkpoint directory with a "
        "'latest' file or global_step* directories, or one global_step* directory); "
        "use 'auto' to start fresh when there is none"
    )


def _read_latest(root: Path) -> str | None:
    latest = root / LATEST
    if not latest.is_file():
        return None
    return latest.read_text().strip() or None


def load(engine, load_dir: str, tag: str) -> dict[str, Any]:
    """Load model + optimizer states (DeepSpeed), this rank's RNG states; returns our client state."""
    path, client = engine.load_checkpoint(load_dir, tag=tag)
    if path is None or client is None or "seco" not in client:
        raise ValueError(
            f"checkpoint {os.path.join(load_dir, tag)!r} could not be loaded or was not written by this engine"
        )
    rng_file = Path(load_dir) / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():  # absent when the world size grew; a fresh RNG is then all we can do
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client["seco"]


# -------------------------------------------------------------------------------------------------- save


def save(engine, ckpt_dir: str, step: int, client_state: dict[str, Any]) -> str:
    """Save a checkpoint of `step` atomically; every rank must call it. Returns the tag directory."""
    root = Path(ckpt_dir)
    tag, tmp = tag_for(step), TMP_PREFIX + tag_for(step)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TMP_PREFIX + "*"):  # leftovers of interrupted saves
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp, client_state={"seco": client_state}, save_latest=False)
    torch.save(rng_state(), root / tmp / f"rng_rank{rank}.pt")
    if os.environ.get(CRASH_HOOK) == str(step):
        raise RuntimeError(f"{CRASH_HOOK}={step}: simulated crash in the middle of a checkpoint save")
    dist.barrier()  # every rank's shards are on disk before anything points at them
    if rank == 0:
        _commit(root, tmp, tag)
    dist.barrier()
    return str(root / tag)


def _commit(root: Path, tmp: str, tag: str) -> None:
    # torch.save does not fsync: without this a power loss after the rename could leave a complete-looking
    # directory of empty files. (On a network file system the writers' close() already reached the server.)
    for f in (root / tmp).iterdir():
        _fsync(f)
    final = root / tag
    if final.exists():  # the same step saved before (a run resumed from an older checkpoint): replace it
        old = root / (TMP_PREFIX + "old." + tag)
        os.rename(final, old)
        os.rename(root / tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(root / tmp, final)
    latest_tmp = root / (TMP_PREFIX + LATEST)
    with open(latest_tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, root / LATEST)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # for a directory: its entries, i.e. the renames, survive a power loss
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ export


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
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        if zero3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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


def _save_adapter(model, state: dict[str, torch.Tensor], out: Path) -> None:
    from peft import get_peft_model_state_dict

    # PEFT picks the adapter's tensors out of a full state dict; passing it explicitly also covers ZeRO-3,
    # where the module's own parameters are empty partitions.
    adapter = get_peft_model_state_dict(model, state_dict=state)
    model.save_pretrained(str(out), state_dict=adapter)


def _save_full(model, state: dict[str, torch.Tensor], out: Path) -> None:
    base = model.get_base_model() if hasattr(model, "peft_config") else model
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
