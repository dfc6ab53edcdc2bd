"""The run's output directories (checkpoint.dir, logging.dir) at start-up: checked on every rank before any
process group exists, and locked by rank 0 for the run (engine/run_lock.py), so that a second run on the same
directories is refused in seconds, naming the run that holds them.

A start that fails after the lock was taken (bad data, a bad checkpoint) leaves nothing behind: the lock
file and the directories it created are removed again (`Claim.abandon`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine import checkpoint, metrics
from engine.config import Config
from engine.run_lock import LOCK_FILE, RunLock, acquire


@dataclass
class Claim:
    locks: list[RunLock] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)  # directories that did not exist before, deepest last

    def release(self) -> None:
        """The run is over: unlock (the kernel would do it at exit anyway)."""
        for lock in self.locks:
            lock.release()
        self.locks = []

    def abandon(self) -> None:
        """The start failed: unlock and remove what the claim created, so a failed start writes nothing."""
        for lock in self.locks:
            if lock.users == 1:
                with contextlib.suppress(OSError):
                    os.unlink(lock.directory / LOCK_FILE)
        self.release()
        for d in reversed(self.created):
            with contextlib.suppress(OSError):  # not empty: something else was written there
                os.rmdir(d)


def claim(cfg: Config, rank: int) -> Claim:
    """Every rank: no name the run writes is a symbolic link (UnsafePath, exit 2). Rank 0: lock the
    directories (RunLocked, exit 2, naming the holder)."""
    checkpoint.check_dir(cfg.checkpoint.dir)
    metrics.check_dir(cfg.logging.dir)
    result = Claim()
    if rank != 0:
        return result
    dirs = {"checkpoint.dir": cfg.checkpoint.dir, "logging.dir": cfg.logging.dir}
    seen: set[str] = set()
    try:
        for key, d in dirs.items():
            if d is None or os.path.realpath(d) in seen:
                continue
            seen.add(os.path.realpath(d))
            result.created += _missing(Path(d))
            result.locks.append(acquire(d, key))
    except BaseException:
        result.abandon()
        raise
    return result


def _missing(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, outermost first (acquire creates them)."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out[::-1]
