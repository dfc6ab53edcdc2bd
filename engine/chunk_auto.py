"""chunking.chunk_size: auto, resolved at start-up (before any process group) by the planner (engine/plan): the
largest of 128, 256, ... (up to data.seq_len) whose step fits in this device's memory, or on CPU in this
rank's share of the host's. Every rank of a homogeneous job computes the same choice from the same totals."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from engine.config import Config


def device_memory() -> tuple[int, str, str]:
    """(bytes, device for the planner, what they are): the GPU's total, or this rank's share of host RAM."""
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, "cuda", f"{props.name}'s {props.total_memory / 2**30:.1f} GiB"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // local, "cpu", f"{host / 2**30:.1f} GiB of host memory / {local} local ranks"


def resolve_chunk_size(
    cfg: Config, world_size: int, memory: tuple[int, str, str] | None = None
) -> tuple[Config, str]:
    """(cfg with an integer chunk size, a line saying what was chosen and why; '' when it was set).
    `memory`: (bytes, device, description), this machine's by default (tests pass their own)."""
    if cfg.chunking.chunk_size != "auto":
        return cfg, ""
    from engine.plan import ModelShape, choose_chunk_size
    from engine.plan.cli import setup_from_config
    from engine.plan.setup import usable_memory

    total, device, what = memory or device_memory()
    budget = usable_memory(total)
    shape = ModelShape.from_config(_model_fields(cfg))
    setup = {**setup_from_config(cfg, device, world_size), "chunk_size": 1}
    chosen = choose_chunk_size(shape, seq_len=cfg.data.seq_len, device_memory=budget, **setup)
    if not chosen:
        raise ValueError(
            f"chunking.chunk_size: auto: no chunk size fits data.seq_len {cfg.data.seq_len} in {what} "
            f"({budget / 2**30:.2f} GiB usable): see python -m engine.plan for what takes the memory"
        )
    resolved = dataclasses.replace(cfg, chunking=dataclasses.replace(cfg.chunking, chunk_size=chosen))
    line = (
        f"chunking.chunk_size: auto -> {chosen} (the planner's largest chunk whose step fits at data.seq_len "
        f"{cfg.data.seq_len} in {what}, {budget / 2**30:.2f} GiB usable)"
    )
    return resolved, line


def _model_fields(cfg: Config) -> dict:
    from engine.hub import cached_snapshot, is_hub_id
    from engine.plan import load_model_config

    if cfg.model.hf_config is not None:
        return dict(cfg.model.hf_config)
    path = str(cfg.model.name_or_path)
    if is_hub_id(path):
        snapshot = cached_snapshot(path)
        if snapshot is None:
            raise ValueError(
                f"chunking.chunk_size: auto needs model.name_or_path {path!r}'s config in the HF cache"
            )
        path = str(snapshot)
    return load_model_config(model=str(Path(path)))[1]
