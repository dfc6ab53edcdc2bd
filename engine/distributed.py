"""Everything DeepSpeed / torch.distributed: the backends chunk-wise backprop runs on, and the ds_config.

The algorithm (engine/chunkwise.py) asks its backend four things: agree on the step's shape with the other
data-parallel ranks, sum a number over them, backprop one chunk, and wrap pass 2 in whatever makes the
gradient reduction happen once per optimizer step. ``derive_ds_config`` turns a run config into the
ds_config handed to ``deepspeed.initialize``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, DeepSpeedConfig, _require


class LocalBackend:
    """A plain (PEFT-wrapped or not) transformers model in one process."""

    world_size = 1
    must_backward = False  # nothing to synchronise: an empty SpaCO draw simply adds nothing
    accumulates_fp32 = False  # 16-bit .grad needs our own float32 accumulation across chunks

    def __init__(self, model):
        self.module = model

    def agree(self, seq_len: int, num_tokens: int) -> tuple[int, int]:
        return seq_len, num_tokens

    def total(self, x: float) -> float:
        return x

    def step_context(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        loss.backward()


class DeepSpeedBackend:
    """A `deepspeed.DeepSpeedEngine`. Every data-parallel rank must issue the same number of chunk forwards
    and backwards, or ZeRO's collectives deadlock: ranks pad to the longest sequence and draw with one seed.
    The loss is normalised by the *global* token count and multiplied by the world size, since DeepSpeed
    averages gradients over ranks: the update then equals one process training on the whole global batch."""

    must_backward = True  # ZeRO's hooks and reductions expect a backward in every step, on every rank
    accumulates_fp32 = True  # DeepSpeed keeps its own (fp32 for bf16/fp16) gradient accumulation

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module
        self.group = getattr(engine, "data_parallel_group", None)
        self.world_size = dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def agree(self, seq_len: int, num_tokens: int) -> tuple[int, int]:
        (longest,) = self._reduce([seq_len], dist.ReduceOp.MAX)
        (tokens,) = self._reduce([num_tokens], dist.ReduceOp.SUM)
        return int(longest), int(tokens)

    def total(self, x: float) -> float:
        return self._reduce([x], dist.ReduceOp.SUM)[0]

    def step_context(self):
        # ZeRO 1/2/3 can defer all reduction to one flush at the end of the step; stage 0 and the bf16/fp16
        # optimizer wrappers reduce at the accumulation boundary we set on the last backward instead.
        e = self.engine
        if e.zero_optimization_stage() in (1, 2, 3) and hasattr(e.optimizer, "_coalesce_grad_reduction"):
            return e.coalesce_grad_reduction()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_last)
        self.engine.backward(loss)


def backend_for(model):
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # deepspeed is a dependency, but the algorithm does not need it
        return LocalBackend(model)
    return DeepSpeedBackend(model) if isinstance(model, DeepSpeedEngine) else LocalBackend(model)


def unlink_shm_comm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (all ranks on one host) creates one 64 MiB file per rank in
    /dev/shm and never unlinks it, so every CPU job leaked its buffers into RAM-backed tmpfs (we found 17 GiB
    after a day of tests). Once every rank has mapped every buffer the names are no longer needed: unlink
    ours, and the memory goes away with the last process, even one that crashes."""
    if torch.cuda.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    dist.barrier()  # DeepSpeed's init returns only after mapping the peers' buffers: after this, all have
    with contextlib.suppress(FileNotFoundError):  # absent when ranks span hosts or the op is not built
        os.unlink(name)


# ----------------------------------------------------------------------------------------------- ds_config


_ABSENT = object()


def derive_ds_config(cfg: Config, world_size: int) -> dict:
    """The ds_config for deepspeed.initialize / HfDeepSpeedConfig: the user's own (deepspeed.config_file or
    deepspeed.config) with the keys the engine owns filled in from this config.

    Engine-owned keys: train_micro_batch_size_per_gpu, train_batch_size, gradient_accumulation_steps (always
    1: the chunks of one batch replace accumulation), gradient_clipping, bf16/fp16.enabled, optimizer (AdamW),
    scheduler (none: the engine steps its own LR schedule), zero_optimization.stage and the offload devices.
    An owned key the user set to the same value (or "auto") is fine; a different value is a ConfigError naming
    both. Every other key passes through unchanged.
    """
    _require(
        type(world_size) is int and world_size >= 1,
        f"world size: must be a positive int, got {world_size!r}",
    )
    return _derive(cfg, world_size)


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


def _user_ds_config(ds_cfg: DeepSpeedConfig) -> dict:
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
    ds = _user_ds_config(cfg.deepspeed)
    micro, dtype, optim = cfg.data.batch_size, cfg.model.dtype, cfg.optim
    if "bfloat16" in ds:  # DeepSpeed's alias of "bf16"
        _require("bf16" not in ds, "ds_config: set only one of 'bf16' and its alias 'bfloat16'")
        ds["bf16"] = ds.pop("bfloat16")

    owned = [  # (ds_config key, the engine's value, where that value comes from)
        ("train_micro_batch_size_per_gpu", micro, f"data.batch_size = {micro}"),
        ("gradient_accumulation_steps", 1, "chunk-wise backprop, which replaces gradient accumulation"),
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
    for old in ("cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory"):
        _require(
            old not in zero,
            f"ds_config key 'zero_optimization.{old}': DeepSpeed's deprecated spelling; use "
            "deepspeed.offload_optimizer / deepspeed.offload_param (and zero_optimization.offload_*.* for tuning)",
        )
    for name, on in (
        ("offload_optimizer", cfg.deepspeed.offload_optimizer),
        ("offload_param", cfg.deepspeed.offload_param),
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

    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    total = ds.get("train_batch_size")
    if total is not None:
        _require(
            type(total) is int and total % micro == 0,
            f"ds_config key 'train_batch_size' = {total!r} is not a multiple of data.batch_size = {micro} "
            "(it must equal data.batch_size x world size, since gradient_accumulation_steps is 1)",
        )
        if world_size is not None and total != micro * world_size:
            raise ConfigError(
                f"ds_config key 'train_batch_size' = {total} contradicts the engine's value {micro * world_size} "
                f"(data.batch_size = {micro} x world size {world_size}, gradient_accumulation_steps 1); "
                "remove it from the ds_config or make the two agree"
            )
    if world_size is not None:
        ds["train_batch_size"] = micro * world_size

    _check_zero_section(zero)
    return ds


def _check_zero_section(zero: dict) -> None:
    """Let DeepSpeed's own schema reject misspelt zero_optimization keys now, not after the launch."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**copy.deepcopy(zero))
    except Exception as e:  # pydantic.ValidationError, and whatever DeepSpeed's validators raise
        raise ConfigError(f"ds_config 'zero_optimization' rejected by DeepSpeed: {e}") from None
