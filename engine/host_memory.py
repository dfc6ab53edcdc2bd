"""Sizes that cannot fit in host memory, refused before any process group (`data.seq_len: 1e9`,
`data.num_samples: 1e12` otherwise end in a MemoryError, or the OOM killer, after the ranks started).

A lower bound per rank, times the ranks on this host, against the host's physical memory: only a run that
certainly cannot fit is refused (page cache, other processes and fragmentation are not counted):
- the step (CPU runs, where device memory is host memory): the planner's prediction (engine/plan, the one
  memory model) of weights, gradients, optimizer, K/V, activations; with CUDA, what it offloads to the host;
- the batch: input ids, labels and attention mask as int64 (data.batch_size x data.seq_len each);
- the synthetic stream's per-epoch permutation of data.num_samples int64 ids (file data: its own rows).
"""

from __future__ import annotations

import os
from typing import Any

GiB = 1 << 30


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ranks_on_this_host(world_size: int) -> int:
    # LOCAL_WORLD_SIZE: torchrun; LOCAL_SIZE: DeepSpeed's launcher; otherwise assume one rank here.
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return min(int(value), world_size)
    return 1


def needed_per_rank(cfg: Any, world_size: int, cuda: bool) -> dict[str, int]:
    """Bytes of host memory one rank needs at least, by the config key that sets them."""
    data = cfg.data
    need = {"data.seq_len": 3 * 8 * data.batch_size * data.seq_len}
    if data.kind == "synthetic":
        need["data.num_samples"] = 8 * data.num_samples
    step = _planned_step(cfg, world_size, cuda)
    if step is not None:
        need["data.seq_len"] += step  # the step's memory grows with the sequence (K/V, activations)
    return need


def _planned_step(cfg: Any, world_size: int, cuda: bool) -> int | None:
    if cfg.model.hf_config is None:
        return None  # a pretrained model: its config is read only later; the data bounds still apply
    from engine.plan import plan
    from engine.plan.cli import setup_from_config

    try:
        setup = setup_from_config(cfg, device="cuda" if cuda else "cpu", world_size=world_size)
        b = plan(dict(cfg.model.hf_config), seq_len=cfg.data.seq_len, **setup)
    except (ValueError, KeyError, TypeError, NotImplementedError):
        return None  # a model family the planner does not describe: no bound from it
    return b.host if cuda else b.total + b.host


def check_host_memory(cfg: Any, world_size: int, cuda: bool, host_bytes: int | None = None) -> None:
    """ValueError naming the key when the run cannot fit; `host_bytes` defaults to the physical memory."""
    host = physical_memory() if host_bytes is None else host_bytes
    ranks = ranks_on_this_host(world_size)
    need = needed_per_rank(cfg, world_size, cuda)
    total = ranks * sum(need.values())
    if total <= host:
        return
    key = max(need, key=need.get)
    value = getattr(cfg.data, key.split(".")[1])
    parts = ", ".join(f"{k} {v / GiB:,.1f} GiB" for k, v in need.items())
    raise ValueError(
        f"{key}={value}: this run needs at least {total / GiB:,.1f} GiB of host memory ({ranks} rank(s) on "
        f"this host x ({parts})), and this host has {host / GiB:,.1f} GiB"
    )
