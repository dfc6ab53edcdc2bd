"""Checkpoints: atomic save, exact resume, export.

Layout of checkpoint.dir:

    latest                  tag of the newest complete checkpoint (DeepSpeed's convention; written last)
    global_step20/          DeepSpeed's files (model states with our client state, ZeRO optimizer shards)
                            + rng_rank{r}.pt: each rank's RNG states (DeepSpeed keeps rank 0's client state only)
    tmp.global_step40/      a save in progress (or one a crash interrupted): never read, removed by the next save
    zero_to_fp32.py         DeepSpeed's offline consolidation scripts (and zero_to_torch.py)
    export/                 written at the end when checkpoint.export is lora or hf
    run.lock                the running job's host and pid (engine/run_lock.py)

A save writes into tmp.<tag>, and only once every rank has finished is it renamed to <tag> and `latest`
replaced (write + os.replace): a crash at any point leaves the previous checkpoint and `latest` intact, and
every directory named global_step* is complete by construction.

Nothing else in the directory is touched: a save removes only its own temporaries (`tmp.global_stepN`,
`tmp.old.global_stepN`, `tmp.latest`), and none of the names above is ever reached through a symbolic link
(engine/safe_paths.py): a link planted there is refused by name, at start-up and at each save. `latest` must
name a `global_stepN` directory of this directory (never `../x` or an absolute path).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import CheckpointConfig
from engine.distributed.runtime import any_rank
from engine.safe_load import CheckpointError, deepspeed_loads_safely, load_file
from engine.safe_paths import (
    UnsafePath,
    entry,
    is_real_dir,
    is_regular,
    read_small,
    refuse_links,
    write_small,
)

TAG_RE = re.compile(r"^global_step(\d+)$")
TMP_PREFIX = "tmp."
LATEST = "latest"
OWN_TMP_RE = re.compile(r"^tmp\.(old\.)?global_step\d+$")  # this engine's save temporaries, and nothing else
FIXED_NAMES = (
    LATEST,
    TMP_PREFIX + LATEST,
    "zero_to_fp32.py",
    "zero_to_torch.py",
    "export",
    TMP_PREFIX + "export",
)
# DeepSpeed's model states (with our client state): one file, or under ZeRO-3 one per rank (rank 0's read).
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def tag_for(step: int) -> str:
    return f"global_step{step}"


# ------------------------------------------------------------------------------------------------ resume


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def is_own_tag_dir(root: Path, tag: str) -> bool:
    """A tag found in `root` (named by `latest` or listed): a linked one is refused, never followed."""
    path = entry(root, tag, "checkpoint")
    return is_real_dir(path) and any(path.glob("*model_states.pt"))


def _newest_complete(root: Path) -> str | None:
    steps = [
        int(m.group(1))
        for p in root.iterdir()
        if (m := TAG_RE.match(p.name)) and is_own_tag_dir(root, p.name)
    ]
    return tag_for(max(steps)) if steps else None


def check_dir(ckpt_dir: str | None) -> None:
    """Start-up check (every rank, before any process group): no name this engine writes in checkpoint.dir
    is a symbolic link (UnsafePath, a ValueError: exit 2, naming it)."""
    root = Path(ckpt_dir) if ckpt_dir else None
    if root is None or not root.is_dir():
        return
    ours = [p.name for p in root.iterdir() if TAG_RE.match(p.name) or OWN_TMP_RE.match(p.name)]
    refuse_links(root, [*FIXED_NAMES, *ours], "checkpoint.dir")


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
        tag = read_latest(root)
        # `latest` can only be missing or stale after manual deletion; tag directories are complete anyway.
        if tag is None or not is_own_tag_dir(root, tag):
            tag = _newest_complete(root)
        return None if tag is None else (str(root), tag)
    path = Path(ckpt_cfg.resume)
    if _is_tag_dir(path):
        return str(path.parent), path.name
    if path.is_dir():
        tag = read_latest(path)
        if tag is not None and is_own_tag_dir(path, tag):
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


def read_latest(root: Path) -> str | None:
    """The tag `latest` names (None without one). Read without following a link or blocking on a pipe, and
    only a `global_stepN` of this very directory is accepted: a tag such as `../x` or `/abs` would resume
    from weights outside it."""
    latest = root / LATEST
    tag = (read_small(latest, "checkpoint", limit=256) or "").strip()
    if tag and not TAG_RE.match(tag):
        raise UnsafePath(
            f"checkpoint: {str(latest)!r} names {tag[:80]!r}, not a checkpoint of this directory "
            "(global_stepN); it is not followed: delete or correct the file"
        )
    return tag or None


def verify(load_dir: str, tag: str, world_size: int, weights_only: bool = False) -> int:
    """Check a checkpoint before any process group exists, on every rank alike, so that a bad one is a user
    error (exit 2) on all of them rather than a failure of one rank inside a collective. Every file must load
    under `safe_load`'s weights-only rules (nothing in it runs; not truncated), the model states must be
    this engine's, and written by as many data-parallel ranks as there are now: ZeRO shards the optimizer
    states by rank, and DeepSpeed's re-sharding (universal checkpoints) loads with full unpickling.
    `weights_only` (checkpoint.resume_weights_only) accepts another world size where the weights are whole
    in the model states (ZeRO 0-2). Returns the checkpoint's data-parallel world size."""
    tag_dir = Path(load_dir) / tag
    for f in sorted(tag_dir.glob("*.pt")):
        load_file(f, mmap=True)  # mmap: tensor data are not read, only the structure is checked
    states = model_states_file(tag_dir)
    meta = load_file(states, mmap=True)
    if not isinstance(meta, dict) or not isinstance(meta.get("seco"), dict):
        raise CheckpointError(
            f"checkpoint file {str(states)!r} was not written by this engine (no 'seco' state)"
        )
    saved = meta.get("dp_world_size")
    stage = ((meta["seco"].get("config") or {}).get("deepspeed") or {}).get("zero_stage")
    if weights_only and saved != world_size and stage == 3:
        raise CheckpointError(
            f"checkpoint {str(tag_dir)!r} holds ZeRO-3 weights sharded over {saved} data-parallel ranks; "
            f"checkpoint.resume_weights_only with {world_size} ranks needs a ZeRO 0-2 checkpoint (or {saved} ranks)"
        )
    if saved != world_size and not weights_only:
        raise CheckpointError(
            f"checkpoint {str(tag_dir)!r} was written by {saved} data-parallel ranks and this run has "
            f"{world_size}: resume it with {saved} ranks (ZeRO's optimizer states are sharded by rank), or "
            "start a fresh checkpoint.dir, or start from its weights with checkpoint.resume_weights_only"
        )
    return int(saved)


def model_states_file(tag_dir: Path) -> Path:
    for name in MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(
        f"checkpoint {str(tag_dir)!r} has no model states file ({' or '.join(MODEL_STATES)})"
    )


def load(
    engine, load_dir: str, tag: str, weights_only: bool = False, optimizer: bool = True
) -> dict[str, Any]:
    """Load model + optimizer states (DeepSpeed, through `safe_load`), this rank's RNG states; returns our
    client state. A model whose parameters differ from the checkpoint's is refused naming them.
    `weights_only` (checkpoint.resume_weights_only): no RNG states, and the optimizer states only if
    `optimizer` (same world size); without them the optimizer starts from the loaded weights."""
    if engine.load_universal_checkpoint():
        raise CheckpointError(
            "ds_config checkpoint.load_universal is not supported: DeepSpeed's universal loader unpickles "
            "files with code execution allowed"
        )
    _check_same_model(engine, model_states_file(Path(load_dir) / tag))
    with deepspeed_loads_safely(engine):
        path, client = engine.load_checkpoint(
            load_dir,
            tag=tag,
            load_module_only=not optimizer,
            load_optimizer_states=optimizer,
            load_lr_scheduler_states=optimizer,
        )
    if path is None or client is None or "seco" not in client:
        raise CheckpointError(
            f"checkpoint {os.path.join(load_dir, tag)!r} could not be loaded or was not written by this engine"
        )
    if weights_only:
        return client["seco"]
    rank = dist.get_rank()
    rng_file = Path(load_dir) / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file))
    else:  # deleted by hand: everything but the RNG (dropout, sampling) is restored
        print(
            f"WARNING: rank {rank}: {str(rng_file)!r} is missing: this rank continues with a fresh RNG, so the "
            "run does NOT continue bit for bit (weights, optimizer, data order and SpaCO draws are restored)",
            file=sys.stderr,
            flush=True,
        )
    return client["seco"]


def _check_same_model(engine, states: Path) -> None:
    meta = load_file(states, mmap=True)
    if meta.get("param_shapes") is None:  # no ZeRO: the full state dict is there, compare all of it
        saved = {k: tuple(v.shape) for k, v in (meta.get("module") or {}).items()}
        now = {k: tuple(v.shape) for k, v in engine.module.state_dict().items()}
    else:  # ZeRO 1-3: the shapes of the optimizer's parameters (and of frozen ones, where recorded)
        saved = {}
        for group in [*meta["param_shapes"], meta.get("frozen_param_shapes") or {}]:
            saved.update({name: tuple(shape) for name, shape in group.items()})
        trainable_only = not meta.get("frozen_param_shapes")
        now = {
            name: tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: the full shape of a partitioned parameter
            for name, p in engine.module.named_parameters()
            if p.requires_grad or not trainable_only
        }
    differ = [
        f"{k}: {list(saved[k]) if k in saved else 'absent'} in the checkpoint, "
        f"{list(now[k]) if k in now else 'absent'} now"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if differ:
        more = f"; and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise CheckpointError(
            f"the model differs from the checkpoint's ({str(states)!r}), {len(differ)} parameters: "
            + "; ".join(differ[:8])
            + more
            + ". Resume with the checkpoint's model config (see model.* in it), or start a fresh checkpoint.dir"
        )


# -------------------------------------------------------------------------------------------------- save


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


Writer = Callable[[Any, str], None]  # (object, path): writes one checkpoint file


class _GuardedWrites:
    """DeepSpeed's checkpoint engine with every file write going through `write`, an OSError recorded rather
    than raised: DeepSpeed's save has collectives between and after its writes, so a rank whose disk is full
    must still reach them; the ranks then learn of it together (`save`)."""

    def __init__(self, inner: Any, write: Writer | None) -> None:
        self._inner, self._write = inner, write or inner.save
        self.error: tuple[str, OSError] | None = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is None:
            try:
                self._write(state_dict, str(path))
            except OSError as e:
                self.error = (str(path), e)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def save(
    engine,
    ckpt_dir: str,
    step: int,
    client_state: dict[str, Any],
    write: Writer | None = None,
    before_commit: Callable[[int], None] | None = None,
) -> str:
    """Save a checkpoint of `step` atomically; every rank must call it. Returns the tag directory.

    `write` replaces the function that writes one file (tests: a full disk); `before_commit(step)` runs once
    every file is written and before anything points at them (tests: a crash mid-save). A write error on any
    rank removes the temporary directory and raises SaveFailed on every rank.
    """
    root = Path(ckpt_dir)
    tag, tmp = tag_for(step), TMP_PREFIX + tag_for(step)
    rank = dist.get_rank()
    refused = _prepare_dir(root, tag) if rank == 0 else None
    if any_rank(refused is not None):  # also the barrier: the temporary directory exists from here on
        raise SaveFailed(f"checkpoint of step {step} not saved: {refused or 'rank 0 refused its directory'}")
    guard = _GuardedWrites(engine.checkpoint_engine, write)
    engine.checkpoint_engine = guard
    try:
        engine.save_checkpoint(str(root), tag=tmp, client_state={"seco": client_state}, save_latest=False)
        guard.save(rng_state(), str(root / tmp / f"rng_rank{rank}.pt"))
    finally:
        engine.checkpoint_engine = guard._inner
    if any_rank(guard.error is not None):  # a collective: every rank's files are on disk or failed
        if rank == 0:
            shutil.rmtree(root / tmp, ignore_errors=True)
        dist.barrier()
        if guard.error is None:
            raise SaveFailed(f"checkpoint of step {step} not saved: another rank could not write its part")
        path, e = guard.error
        raise SaveFailed(
            f"checkpoint of step {step} not saved: writing {path!r} failed: {e.strerror or e}; its temporary "
            f"directory was removed and the previous checkpoint (if any) in {str(root)!r} is intact"
        )
    if before_commit is not None:
        before_commit(step)
    if rank == 0:
        _commit(root, tmp, tag)
    dist.barrier()
    return str(root / tag)


def _prepare_dir(root: Path, tag: str) -> str | None:
    """Rank 0, before a save: a fresh tmp.<tag>, none of the names the save writes a symbolic link, and the
    leftovers of this engine's interrupted saves removed (only those: OWN_TMP_RE). The refusal, or None."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        refuse_links(root, [*FIXED_NAMES, tag, TMP_PREFIX + tag, TMP_PREFIX + "old." + tag], "checkpoint.dir")
        for stale in root.iterdir():
            if OWN_TMP_RE.match(stale.name) and is_real_dir(stale):
                shutil.rmtree(stale)
        if is_regular(root / (TMP_PREFIX + LATEST)):
            os.unlink(root / (TMP_PREFIX + LATEST))
        os.mkdir(root / (TMP_PREFIX + tag))  # DeepSpeed writes into this very directory (makedirs exist_ok)
    except (UnsafePath, OSError) as e:
        return str(e)
    return None


def _commit(root: Path, tmp: str, tag: str) -> None:
    # torch.save does not fsync: without this a power loss after the rename could leave a complete-looking
    # directory of empty files. (On a network file system the writers' close() already reached the server.)
    for f in (root / tmp).iterdir():
        _fsync(f)
    final = entry(root, tag, "checkpoint.dir")
    if final.exists():  # the same step saved before (a run resumed from an older checkpoint): replace it
        old = entry(root, TMP_PREFIX + "old." + tag, "checkpoint.dir")
        os.rename(final, old)
        os.rename(root / tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(root / tmp, final)
    latest_tmp = entry(root, TMP_PREFIX + LATEST, "checkpoint.dir")
    write_small(latest_tmp, tag)  # O_EXCL | O_NOFOLLOW: a link planted since the check is not followed
    os.replace(latest_tmp, root / LATEST)  # replaces the entry itself, never a link's target
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # for a directory: its entries, i.e. the renames, survive a power loss
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers, so that `safe_load.load_file` (weights-only)
    can read them back; the numpy state is the MT19937 key array plus its position and cached Gaussian."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937", kind
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
