"""One writer per run directory: `DIR/run.lock`, held by the run's rank 0 from its start to its exit.

The file names its holder (host and pid) and carries an advisory lock (fcntl.flock) that the kernel
releases on any exit, SIGKILL and crashes included. A second run finds the lock taken and is refused,
naming the holder; a lock file left by a run that is gone (the flock is free) is taken over with a
message. Where the file system has no locks (ENOLCK, EOPNOTSUPP), the holder's pid decides on the same
host, and a holder on another host is refused (there is no way to tell it is gone: delete the file).

Only global rank 0 takes it: every run has exactly one, so two runs on one directory always meet there,
and the ranks of one run never refuse each other (several hosts share the directory). Within one process
the lock is re-entrant (a test that builds two runs on one directory in-process).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from engine.safe_paths import UnsafePath, entry, read_small

LOCK_FILE = "run.lock"
_HELD: dict[str, RunLock] = {}  # realpath of the directory -> this process's lock on it


class RunLocked(ValueError):
    """Another run holds the directory (a user error: exit 2)."""


class RunLock:
    def __init__(self, directory: Path, fd: int) -> None:
        self.directory, self.fd, self.users = directory, fd, 1

    def release(self) -> None:
        self.users -= 1
        if self.users or self.fd < 0:
            return
        _HELD.pop(os.path.realpath(self.directory), None)
        try:
            os.ftruncate(self.fd, 0)  # an empty file: the next run has nothing to take over
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = -1


def acquire(directory: str | Path, key: str) -> RunLock:
    """Lock `directory` (created if missing) for this process; `key` names it in messages (checkpoint.dir)."""
    directory = Path(directory)
    held = _HELD.get(os.path.realpath(directory))
    if held is not None:
        held.users += 1
        return held
    directory.mkdir(parents=True, exist_ok=True)
    path = entry(directory, LOCK_FILE, key)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UnsafePath(f"{key}: cannot open the lock file {str(path)!r}: {e.strerror}") from None
    try:
        holder = _holder(path, key)
        _take(fd, path, key, holder)
    except BaseException:
        os.close(fd)
        raise
    if holder is not None and holder != _me():
        print(
            f"warning: {key}: taking over {str(path)!r}, left by a run that has ended "
            f"(pid {holder[1]} on {holder[0]})",
            file=sys.stderr,
            flush=True,
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{_me()[0]} {_me()[1]}\n".encode(), 0)
    lock = RunLock(directory, fd)
    _HELD[os.path.realpath(directory)] = lock
    return lock


def _take(fd: int, path: Path, key: str, holder: tuple[str, int] | None) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if holder is None or holder == _me() or (holder[0] == _me()[0] and not _alive(holder[1])):
            return  # no locks on this file system: the holder's pid decides
    who = f"pid {holder[1]} on host {holder[0]}" if holder else "a process that has not written its name yet"
    raise RunLocked(
        f"{key}: {str(path.parent)!r} is in use by another run ({who}; lock file {str(path)!r}). "
        "Two runs writing one directory would mix their checkpoints: wait for it to end, or use another "
        f"{key}"
    )


def _holder(path: Path, key: str) -> tuple[str, int] | None:
    text = read_small(path, f"{key}: lock file")
    parts = (text or "").split()
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _me() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
