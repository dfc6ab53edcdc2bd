"""How a chunk-wise step holds its memory: `ChunkOptions`, one default each, validated in one place.

The launch trainer, `ChunkwiseTrainer` and the planner all take a `ChunkOptions`; a run config's `chunking`
section produces one (`ChunkOptions.from_config`). `check_options` holds the rules and is called both here
and by that section (engine/config.py), so an error names the key as the caller spells it.

This module imports no torch: validating a config or planning must not pull it in.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

OFFLOAD_KV = (False, True, "auto")
KV_GRAD_DTYPES = ("float32", "bfloat16")


class OptionsError(ValueError):
    """A user error in the chunk options."""


def check_options(s: Any, prefix: str = "", error: type[ValueError] = OptionsError) -> None:
    """Every rule on the option fields of `s` (a ChunkOptions or the config's chunking section)."""
    p = prefix

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise error(message)

    need(s.offload_kv in OFFLOAD_KV, f"{p}offload_kv={s.offload_kv!r} must be true, false or 'auto'")
    need(
        s.kv_grad_dtype in KV_GRAD_DTYPES,
        f"{p}kv_grad_dtype={s.kv_grad_dtype!r} is not one of {KV_GRAD_DTYPES}",
    )
    budget = s.kv_device_budget
    need(
        budget is None or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0),
        f"{p}kv_device_budget: must be >= 0 bytes or null, got {budget}",
    )
    size = s.loss_slice
    need(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1,
        f"{p}loss_slice: must be >= 1, got {size!r}",
    )


@dataclass(frozen=True)
class ChunkOptions:
    """Where a chunk-wise step keeps its state and what it recomputes; every option is exact.

    offload_kv: K/V checkpoints and their gradients in (pinned) host memory, fetched layer by layer
        (engine/kv_cache.py); "auto": layers stay on the device while they fit in `kv_device_budget` bytes.
    kv_grad_dtype: what K/V gradients accumulate in, never below the K/V's own dtype (only bf16 models get
        bfloat16; float32 / float64 models keep theirs).
    checkpoint_layers: recompute each decoder layer in its chunk's backward (engine/layer_checkpoint.py).
    fused_loss: each chunk's loss `loss_slice` tokens per row at a time, never the chunk's whole logits
        (engine/loss.py; heads it cannot reproduce fall back to the whole-chunk loss, logged once).
    """

    offload_kv: bool | str = False
    kv_device_budget: int | None = None
    kv_grad_dtype: str = "bfloat16"
    checkpoint_layers: bool = False
    fused_loss: bool = True
    loss_slice: int = 128

    def __post_init__(self):
        check_options(self)

    @classmethod
    def from_config(cls, chunking: Any) -> ChunkOptions:
        """The options of a run config's `chunking` section (same field names)."""
        return cls(**{f.name: getattr(chunking, f.name) for f in fields(cls)})
