"""Everything DeepSpeed / torch.distributed, behind a few functions (the trainer keeps the loop):

* ``ds_config``: the ds_config derived from a run config and the user's own (``derive_ds_config``), checked
  at config load (``check_ds_config``);
* ``rendezvous``: the ranks meet before preparing and agree on everyone's readiness (``join_rendezvous``);
* ``runtime``: joining the process group (``init_distributed``), the ZeRO-3 partitioned load
  (``zero3_context``), ``initialize``, the optimizer step or its skip (``optimizer_step``), ``shutdown``.

What chunk-wise backprop needs from a plain module or a DeepSpeed engine is engine/backend.py's, next to the
algorithm.

Checkpoints (DeepSpeed's save/load with our atomic commit) are engine/checkpoint.py's.
"""

from engine.distributed.ds_config import check_ds_config, derive_ds_config, grad_accum_steps
from engine.distributed.runtime import (
    announced_rank,
    announced_world_size,
    any_rank,
    init_distributed,
    initialize,
    join_rendezvous,
    optimizer_step,
    run_ds_config,
    shutdown,
    unlink_shm_comm_buffers,
    zero3_context,
)

__all__ = [
    "announced_rank",
    "announced_world_size",
    "any_rank",
    "check_ds_config",
    "derive_ds_config",
    "grad_accum_steps",
    "init_distributed",
    "initialize",
    "join_rendezvous",
    "optimizer_step",
    "run_ds_config",
    "shutdown",
    "unlink_shm_comm_buffers",
    "zero3_context",
]
