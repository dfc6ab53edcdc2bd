"""The dataset built once per host: the first rank to come builds (reads, renders, tokenizes) and saves it,
the other ranks of the host load that file instead of tokenizing the same data again.

Without it every rank tokenizes on its own: N ranks per host take N times the time and hold N copies of the
tokens. Here the tokens are loaded memory-mapped, so the ranks of a host share one copy in the page cache.

The file lives in a directory of this user's under the system temporary directory (`TMPDIR`), host-local on
clusters: `seco-data-<uid>/`, mode 0700, refused (the rank then builds for itself) unless it is a real
directory owned by this user and closed to others, since the file is unpickled. Its name is a fingerprint
of everything the result depends on: the data section, the model's vocabulary size, every input file's
size and modification time (data, tokenizer, chat template), the data code and the library versions; a
change to any of them builds anew. An advisory lock (`flock`) per fingerprint makes the ranks take turns:
the first builds while the others wait, then each loads. A build that fails with a user error leaves its
message for the ranks that waited, which report it at once instead of failing the same way one by one.
Entries not used for `KEEP_SECONDS` are removed when a new one is written (a resumed run reuses its entry);
where the system temporary directory is memory-backed (tmpfs), point `TMPDIR` at a local disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
KEEP_SECONDS = 7 * 24 * 3600
_MAX_FILES = 10_000  # per input directory, for the fingerprint (a hub cache can hold many)
_CODE = Path(__file__).resolve().parent  # engine/data: how records become tokens


def once_per_host(key: dict[str, Any], build: Callable[[], Any], root: Path | None = None) -> Any:
    """`build()`'s result, built by one process per host for the same `key` and loaded by the others."""
    root = _private_dir(root or Path(tempfile.gettempdir()) / f"seco-data-{os.getuid()}")
    if root is None:
        return build()
    name = fingerprint(key)
    data, error = root / f"{name}.pt", root / f"{name}.error"
    waited_from = time.time()
    with _locked(root / f"{name}.lock"):
        if _owned_file(data):
            os.utime(data)  # used: kept by the eviction
            return torch.load(data, weights_only=False, mmap=True)  # our own file, in our own 0700 directory
        if _owned_file(error) and error.stat().st_mtime >= waited_from:
            raise ValueError(error.read_text(encoding="utf-8"))  # a rank of this run failed on it just now
        try:
            result = build()
        except ValueError as e:
            message = str(e).encode("utf-8")
            _write_atomic(error, lambda f: f.write(message))
            raise
        try:
            _write_atomic(data, lambda f: torch.save(result, f))
            # The builder too reads the tokens from the file's pages, which all ranks of the host share.
            result = torch.load(data, weights_only=False, mmap=True)
        except Exception as e:  # not picklable, disk full: the run goes on, each rank builds for itself
            logger.warning("the built dataset could not be cached for the other ranks of this host: %s", e)
        error.unlink(missing_ok=True)
    _evict(root, keep=name)
    return result


def build_dataset_once_per_host(
    data_cfg: Any, tokenizer: Any, vocab_size: int | None, trust_remote_code: bool, root: Path | None = None
):
    """engine.data.build_dataset, run once per host for file data (synthetic data is generated, not read)."""
    from engine.data import build_dataset

    def build():
        return build_dataset(data_cfg, tokenizer, vocab_size)

    if data_cfg.kind == "synthetic":
        return build()
    return once_per_host(dataset_key(data_cfg, vocab_size, trust_remote_code), build, root)


def dataset_key(data_cfg: Any, vocab_size: int | None, trust_remote_code: bool) -> dict[str, Any]:
    """What a built dataset depends on: the config, the files it names (by size and mtime), the code."""
    section = dataclasses.asdict(data_cfg)
    files = {os.path.abspath(v): _file_stats(Path(v)) for v in _strings(section) if os.path.exists(v)}
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_CODE.glob("*.py")))).hexdigest()
    versions = {}
    for lib in ("torch", "transformers", "tokenizers", "datasets", "jinja2"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[lib] = metadata.version(lib)
    return {
        "data": section,
        "files": files,
        "vocab_size": vocab_size,
        "trust_remote_code": trust_remote_code,
        "code": code,
        "versions": versions,
    }


def fingerprint(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _file_stats(path: Path) -> list[tuple[str, int, int]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:_MAX_FILES]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _private_dir(root: Path) -> Path | None:
    """`root`, created 0700 if absent; None (no cache) unless it is our own private directory."""
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    try:
        st = os.lstat(root)
    except OSError:
        return None
    mine = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
    return root if mine else None


def _owned_file(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released with the descriptor, also when the process dies
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _evict(root: Path, keep: str) -> None:
    """Remove entries unused for KEEP_SECONDS (a rank still reading one has it mapped: unlinking is safe)."""
    cutoff = time.time() - KEEP_SECONDS
    for entry in root.iterdir():
        if entry.name.startswith(keep) or not _owned_file(entry):
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
