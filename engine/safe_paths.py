"""Paths the engine writes or reads inside a run's own directories (checkpoint.dir, logging.dir).

Every entry the engine writes there has a name of its own (`latest`, `tmp.global_step20`, `metrics.jsonl` ...)
and is reached without following a symbolic link: a link planted under such a name would otherwise turn a
save into a write outside the directory (an overwritten file, a model directory replaced, a script made
executable). `entry` gives such a path or refuses it by name; `read_small` reads a short control file
(`latest`, a lock file) without following a link, without blocking on a named pipe and without reading a
huge file whole. Stdlib only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafePath(ValueError):
    """An entry of a run directory the engine will not use: a symbolic link, a pipe, a name leaving it."""


def entry(root: Path, name: str, what: str) -> Path:
    """root/name, where `name` is one path component and the entry, if present, is not a symbolic link."""
    if not name or name in (".", "..") or "/" in name or (os.altsep and os.altsep in name):
        raise UnsafePath(f"{what}: {name!r} is not a name inside {str(root)!r}")
    path = Path(root) / name
    if path.is_symlink():  # lstat: the link itself, never its target
        raise UnsafePath(
            f"{what}: {str(path)!r} is a symbolic link; the engine writes there and never follows a link "
            f"out of {str(root)!r}: remove it"
        )
    return path


def refuse_links(root: Path, names: list[str], what: str) -> None:
    """`entry` for each name (a start-up check of every name a run will write)."""
    for name in names:
        entry(root, name, what)


def is_regular(path: Path) -> bool:
    """A regular file, the path itself (a link is not followed; a pipe or device is not opened)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def is_real_dir(path: Path) -> bool:
    """A directory, the path itself (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def read_small(path: Path, what: str, limit: int = 4096) -> str | None:
    """The UTF-8 text of a short control file, or None when it does not exist. Refused by name: a symbolic
    link, anything but a regular file (a named pipe would block the reader), more than `limit` bytes,
    bytes that are not UTF-8."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise UnsafePath(f"{what}: {str(path)!r} is a symbolic link; it is not followed: remove it")
    if not stat.S_ISREG(mode):
        raise UnsafePath(f"{what}: {str(path)!r} is not a regular file (a pipe, socket or device?)")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{what}: {str(path)!r} is larger than {limit} bytes: not what the engine wrote")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafePath(
            f"{what}: {str(path)!r} is not UTF-8 text (byte {e.start}): not what the engine wrote"
        ) from None


def write_small(path: Path, text: str) -> None:
    """Create `path` (which must not exist: a link planted meanwhile is not followed) with `text`, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
