"""The ds_config handed to deepspeed.initialize, derived from a run config and the user's own ds_config."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from engine.config import Config, ConfigError, DeepSpeedConfig, _require

_ABSENT = object()


def derive_ds_config(cfg: Config, world_size: int) -> dict:
    """The ds_config for deepspeed.initialize / HfDeepSpeedConfig: the user's own (deepspeed.config_file or
    deepspeed.config) with the keys the engine owns filled in from this config.

    Engine-owned keys: train_micro_batch_size_per_gpu, train_batch_size, gradient_accumulation_steps,
    gradient_clipping, bf16/fp16.enabled, optimizer (AdamW), scheduler (none: the engine steps its own LR
    schedule), zero_optimization.stage and the offload devices. An owned key the user set to the same value (or
    "auto") is fine; a different value is a ConfigError naming both. Every other key passes through unchanged.

    Accumulation: the user's gradient_accumulation_steps is optim.grad_accum_steps (grad_accum_steps), and
    train_batch_size must equal the effective batch (micro batch x accumulation x world size). The trainer runs
    the micro-batches itself inside one DeepSpeed step, so DeepSpeed's own gradient_accumulation_steps is 1
    (its backward would otherwise divide every micro-batch's gradient by it) and its train_batch_size is
    micro batch x world size.
    """
    _require(
        type(world_size) is int and world_size >= 1,
        f"world size: must be a positive int, got {world_size!r}",
    )
    return _derive(cfg, world_size)


def grad_accum_steps(cfg: Config) -> int:
    """Micro-batches per optimizer step: optim.grad_accum_steps, else the user's ds_config
    gradient_accumulation_steps, else 1; the two set to different values is a ConfigError naming both."""
    ours = cfg.optim.grad_accum_steps
    theirs = user_ds_config(cfg.deepspeed).get("gradient_accumulation_steps", "auto")
    if theirs in ("auto", None):
        return 1 if ours is None else ours
    _require(
        type(theirs) is int and theirs >= 1,
        f"ds_config key 'gradient_accumulation_steps': must be a positive int or 'auto', got {theirs!r}",
    )
    if ours is not None and ours != theirs:
        raise ConfigError(
            f"ds_config key 'gradient_accumulation_steps' = {theirs} contradicts optim.grad_accum_steps = {ours}; "
            "set one of them (or make the two agree)"
        )
    return theirs


def check_ds_config(cfg: Config) -> None:
    """Check the user's ds_config against `cfg` at config load (the world size is known only later)."""
    _derive(cfg, world_size=None)


def _agree(theirs: Any, ours: Any) -> bool:
    if isinstance(theirs, bool) or isinstance(ours, bool):
        return type(theirs) is type(ours) and theirs == ours
    if isinstance(ours, (int, float)):
        return isinstance(theirs, (int, float)) and float(theirs) == float(ours)
    if isinstance(ours, list):
        return (
            isinstance(theirs, (list, tuple)) and len(theirs) == len(ours) and all(map(_agree, theirs, ours))
        )
    if isinstance(ours, str):  # DeepSpeed matches optimizer names case-insensitively
        return isinstance(theirs, str) and theirs.lower() == ours.lower()
    return theirs == ours


def _contradiction(ds_key: str, theirs: Any, ours: Any, source: str) -> ConfigError:
    return ConfigError(
        f"ds_config key '{ds_key}' = {theirs!r} contradicts the engine's value {ours!r} (from {source}); "
        "the engine owns this key: remove it from the ds_config or make the two agree"
    )


def _mapping_at(ds: dict, dotted: str) -> dict:
    """The (created if absent) mapping at `dotted` inside the user's ds_config."""
    node = ds
    for i, part in enumerate(dotted.split(".")):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        _require(
            isinstance(child, dict),
            f"ds_config key '{'.'.join(dotted.split('.')[: i + 1])}': expected a mapping",
        )
        node = child
    return node


def user_ds_config(ds_cfg: DeepSpeedConfig) -> dict:
    if ds_cfg.config is not None:
        return copy.deepcopy(ds_cfg.config)
    if ds_cfg.config_file is None:
        return {}
    file = Path(ds_cfg.config_file)
    _require(
        file.is_file(), f"deepspeed.config_file: {str(file)!r} not found (expected a ds_config JSON file)"
    )
    try:
        ds = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_file: {file} is not valid JSON: {e}") from None
    _require(isinstance(ds, dict), f"deepspeed.config_file: {file} must hold a JSON object")
    return ds


def _derive(cfg: Config, world_size: int | None) -> dict:
    ds = user_ds_config(cfg.deepspeed)
    micro, dtype, optim = cfg.data.batch_size, cfg.model.dtype, cfg.optim
    accum = grad_accum_steps(cfg)
    ds.pop("gradient_accumulation_steps", None)  # the user's value is `accum` (DeepSpeed's own is 1)
    if "bfloat16" in ds:  # DeepSpeed's alias of "bf16"
        _require("bf16" not in ds, "ds_config: set only one of 'bf16' and its alias 'bfloat16'")
        ds["bf16"] = ds.pop("bfloat16")

    owned = [  # (ds_config key, the engine's value, where that value comes from)
        ("train_micro_batch_size_per_gpu", micro, f"data.batch_size = {micro}"),
        ("gradient_accumulation_steps", 1, "the trainer's micro-batch loop inside one DeepSpeed step"),
        ("gradient_clipping", optim.grad_clip or 0.0, f"optim.grad_clip = {optim.grad_clip} (0: no clipping)"),
        ("bf16.enabled", dtype == "bfloat16", f"model.dtype = {dtype!r}"),
        ("fp16.enabled", dtype == "float16", f"model.dtype = {dtype!r}"),
        ("optimizer.type", "AdamW", "the engine's optimizer, AdamW configured by optim.*"),
        ("optimizer.params.lr", optim.lr, f"optim.lr = {optim.lr}"),
        ("optimizer.params.betas", list(optim.betas), f"optim.betas = {list(optim.betas)}"),
        ("optimizer.params.eps", optim.eps, f"optim.eps = {optim.eps}"),
        ("optimizer.params.weight_decay", optim.weight_decay, f"optim.weight_decay = {optim.weight_decay}"),
        ("zero_optimization.stage", cfg.deepspeed.zero_stage, f"deepspeed.zero_stage = {cfg.deepspeed.zero_stage}"),
    ]  # fmt: skip
    for ds_key, ours, source in owned:
        parent, _, leaf = ds_key.rpartition(".")
        node = _mapping_at(ds, parent) if parent else ds
        theirs = node.get(leaf, _ABSENT)
        if theirs is not _ABSENT and theirs != "auto" and not _agree(theirs, ours):
            raise _contradiction(ds_key, theirs, ours, source)
        node[leaf] = ours  # also normalises agreeing spellings ("adamw", 1 for 1.0)

    if ds.get("scheduler") is not None:
        raise _contradiction(
            "scheduler", ds["scheduler"], None, f"optim.schedule = {optim.schedule!r}, stepped by the engine"
        )
    ds.pop("scheduler", None)

    zero = ds["zero_optimization"]
    _derive_offload(zero, cfg.deepspeed)

    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    total = ds.get("train_batch_size")
    if total is not None:
        _require(
            type(total) is int and total % (micro * accum) == 0,
            f"ds_config key 'train_batch_size' = {total!r} is not a multiple of data.batch_size = {micro} x "
            f"gradient accumulation {accum} (it must equal data.batch_size x optim.grad_accum_steps x world size)",
        )
        if world_size is not None and total != micro * accum * world_size:
            raise ConfigError(
                f"ds_config key 'train_batch_size' = {total} contradicts the engine's value "
                f"{micro * accum * world_size} (data.batch_size = {micro} x optim.grad_accum_steps = {accum} x "
                f"world size {world_size}); remove it from the ds_config or make the two agree"
            )
    if world_size is not None:
        ds["train_batch_size"] = micro * world_size

    _check_zero_section(zero)
    return ds


def _derive_offload(zero: dict, deepspeed) -> None:
    """zero_optimization.offload_*.device from deepspeed.offload_optimizer / offload_param."""
    for old in ("cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory"):
        _require(
            old not in zero,
            f"ds_config key 'zero_optimization.{old}': DeepSpeed's deprecated spelling; use "
            "deepspeed.offload_optimizer / deepspeed.offload_param (and zero_optimization.offload_*.* for tuning)",
        )
    for name, on in (
        ("offload_optimizer", deepspeed.offload_optimizer),
        ("offload_param", deepspeed.offload_param),
    ):
        if zero.get(name) is None and not on:
            continue
        section = _mapping_at(
            zero, name
        )  # keeps the user's tuning (pin_memory, nvme_path, buffer_count, ...)
        device = section.get("device")
        if device in (None, "auto"):
            section["device"] = "cpu" if on else "none"
        elif (device != "none") != on:  # "cpu" and "nvme" both mean offloading
            raise _contradiction(
                f"zero_optimization.{name}.device",
                device,
                "cpu" if on else "none",
                f"deepspeed.{name} = {on}",
            )


def _check_zero_section(zero: dict) -> None:
    """Let DeepSpeed's own schema reject misspelt zero_optimization keys now, not after the launch."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**copy.deepcopy(zero))
    except Exception as e:  # pydantic.ValidationError, and whatever DeepSpeed's validators raise
        raise ConfigError(f"ds_config 'zero_optimization' rejected by DeepSpeed: {e}") from None
