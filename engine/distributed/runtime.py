"""The process group and the DeepSpeed engine's life: join (deepspeed launcher, torchrun, srun, mpirun, or a
world of one), build the ds_config for this machine, deepspeed.initialize, the optimizer step or its skip,
and leave.

Optimizer: the ds_config's AdamW. DeepSpeed then picks FusedAdam (GPU; a JIT build on first use unless
DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1) or DeepSpeedCPUAdam under ZeRO-Offload (JIT build of
cpu_adam; several times faster than torch's AdamW on the host). On a machine without CUDA the engine asks
for torch.optim.AdamW instead (`torch_adam: true`, unless the ds_config sets it): the CPU builds of
fused_adam / cpu_adam take minutes on a small CI machine and buy nothing at test sizes.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.distributed as dist

from engine.config import Config
from engine.distributed import rendezvous
from engine.distributed.ds_config import derive_ds_config
from engine.distributed.rendezvous import Rendezvous
from engine.zero3_leaves import mark_moe_blocks_as_leaves


def announced_world_size() -> int:
    """The world size the launcher announced, known before any process group exists."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return mpi_world_size() or 1


def announced_rank() -> int:
    """This process's global rank as the launcher announced it, known before any process group exists."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def run_ds_config(cfg: Config, world_size: int) -> dict:
    """derive_ds_config, plus what this machine needs: torch's AdamW where there is no CUDA (module doc)."""
    ds_config = derive_ds_config(cfg, world_size)
    if not torch.cuda.is_available():
        ds_config["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    return ds_config


def zero3_context(ds_config: dict):
    """Under ZeRO-3, an `HfDeepSpeedConfig` that makes transformers build the model already partitioned
    (deepspeed.zero.Init) instead of materialising it whole on every rank first; None otherwise.

    transformers keeps only a weak reference to it: the caller must hold the returned object for as long
    as the model lives (loading, saving and gathering all consult it).
    """
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def init_distributed(rdzv: Rendezvous | None = None) -> None:
    """Join the process group: on the rendezvous store every rank met in before preparing (`rdzv`,
    engine/distributed/rendezvous.py), from RANK etc. in the environment (deepspeed / torchrun / srun without
    a store), under mpirun through DeepSpeed's MPI discovery, and as a world of one on an in-memory store
    when started as plain `python launch/train.py`.

    Rank, world size and store are passed to torch explicitly: nothing here announces a rank in the process
    environment, which a later in-process library (HF Trainer, accelerate) would read as a launcher's and
    join a group of its own. The one exception is LOCAL_RANK, which DeepSpeed's engine and zero.Init read from
    the environment only; if this function sets it, `shutdown` removes it again."""
    import deepspeed

    if dist.is_initialized():
        return
    remember_rank_env()
    mpi = mpi_world_size() is not None and "RANK" not in os.environ
    if torch.cuda.is_available():  # before the process group, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(_local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A hung rank must end the job, not stall it for torch's default 30 minutes: DeepSpeed creates its
    # data-parallel groups later with torch's default timeout, so set that default too (DEEPSPEED_TIMEOUT,
    # minutes, is DeepSpeed's own knob for it).
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout = pg_timeout()
    store, rank, world = (rdzv.store, rdzv.rank, rdzv.world) if rdzv is not None else (None, 0, 1)
    if store is None and not mpi and announced_world_size() == 1:
        store, rank, world = dist.HashStore(), 0, 1  # nobody to meet: no address, no port to take
    if store is not None:
        kwargs = {}
        if torch.cuda.is_available() and world > 1:  # as DeepSpeed does: binds NCCL to this GPU early
            kwargs["device_id"] = torch.device("cuda", _local_rank())
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    os.environ.setdefault("LOCAL_RANK", str(_local_rank()))  # DeepSpeed reads it from there only
    deepspeed.init_distributed(  # wraps the group built above; otherwise builds it from the environment
        dist_backend=backend,
        auto_mpi_discovery=mpi,
        # MPI discovery would otherwise reset MASTER_PORT to 29500: two jobs on a node would collide.
        distributed_port=int(os.environ.get("MASTER_PORT", 29500)),
        timeout=timeout,
        verbose=False,
    )
    unlink_shm_comm_buffers()


# The rank variables (and whether each was there) before this process first joined a group or ran MPI
# discovery, which writes them: `shutdown` puts them back, so that an in-process run leaves the environment
# as it found it.
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_env_before: dict[str, str | None] = {}


def remember_rank_env() -> None:
    """Record the rank variables as they are now, unless already recorded (before a group is joined)."""
    if not _env_before:
        _env_before.update({key: os.environ.get(key) for key in _RANK_ENV})


def restore_rank_env() -> None:
    """Put the recorded rank variables back: set what was set, remove what was not."""
    for key, value in _env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _env_before.clear()


def join_rendezvous() -> Rendezvous:
    """Meet the other ranks before preparing (engine/distributed/rendezvous.py)."""
    return rendezvous.join(pg_timeout())


def pg_timeout():
    """DeepSpeed's process-group timeout (DEEPSPEED_TIMEOUT minutes, default 10)."""
    from deepspeed.constants import default_pg_timeout

    return default_pg_timeout


def _local_rank() -> int:
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def mpi_world_size() -> int | None:
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):  # Open MPI, MPICH / Intel MPI, PMIx
        if key in os.environ:
            return int(os.environ[key])
    return None


def unlink_shm_comm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (all ranks on one host) creates one 64 MiB file per rank in
    /dev/shm and never unlinks it, so every CPU job would leave its buffers in RAM-backed tmpfs (a day of tests
    leaves 17 GiB there). Once every rank has mapped every buffer the names are no longer needed: unlink
    ours, and the memory goes away with the last process, even one that crashes."""
    if torch.cuda.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    dist.barrier()  # DeepSpeed's init returns only after mapping the peers' buffers: after this, all have
    with contextlib.suppress(FileNotFoundError):  # absent when ranks span hosts or the op is not built
        os.unlink(name)


def initialize(model: torch.nn.Module, ds_config: dict, mpu=None) -> Any:
    """deepspeed.initialize on the trainable parameters; returns the DeepSpeedEngine. It copies them into
    its optimizer's fp32 partitions: nothing may change the weights' values or trainability after this.
    Under ZeRO-3 the mixture-of-experts blocks become leaf modules first (engine/zero3_leaves.py).
    `mpu`: DeepSpeed's sequence-parallel groups (engine/sequence_parallel.py's sequence_mpu) or None."""
    import deepspeed

    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        mark_moe_blocks_as_leaves(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config, mpu=mpu)
    return engine


def optimizer_step(engine, loss: float, num_tokens: int) -> bool:
    """engine.step(), or a skip that drops this step's gradients. Returns whether weights were updated.

    The loss and `num_tokens` (the step's loss tokens) went through an all-reduce, so every rank takes the
    same branch. DeepSpeed itself skips (and clears the gradients) when the gradient norm is non-finite
    under ZeRO 1-3, bf16 and fp16; only the plain fp32 stage-0 optimizer would apply NaNs, so there the
    gradients are dropped without stepping.
    """
    loss_is_finite = math.isfinite(loss)
    if not loss_is_finite and not (
        engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
    ):
        engine.zero_grad()
        return False
    engine.step()
    applied = engine.was_step_applied()
    if applied and not loss_is_finite:
        raise RuntimeError(
            f"DeepSpeed applied an update although the loss was {loss} ({num_tokens} loss tokens): "
            f"{_why_applied(engine)}"
        )
    return applied


def _why_applied(engine) -> str:
    """What let a non-finite loss through DeepSpeed's overflow check, for the guard's message."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return (
            "DeepSpeed computed no gradient norm to check; do not turn off zero_optimization.compute_grad_norm "
            "or bf16.check_grad_overflow in the ds_config"
        )
    return (
        f"the gradient was finite (norm {float(norm):.4g}): the non-finite loss came from tokens whose chunks "
        "were not back-propagated (SpaCO) or from the loss alone; check the data and lower optim.lr"
    )


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (a collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined), through DeepSpeed's own teardown: it also drops
    the groups DeepSpeed cached (its clone of the world group, the sequence-parallel groups). torch's alone
    would leave them behind, and the next deepspeed.initialize in this process would use destroyed groups.
    The rank variables the join set (LOCAL_RANK, MPI discovery's) are restored first."""
    restore_rank_env()
    if not dist.is_initialized():
        return
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()
