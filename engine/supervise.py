"""Supervise a training command so that a preemption signal ends in a checkpoint and exit 0, whichever
launcher sits in between (launch/preemptible.py is its command line; the Docker image's entry point).

Why: DeepSpeed's single-node runner (`deepspeed`) installs no signal handler, so a TERM ends it at once and
the ranks train on unseen (as a container's PID 1 it ignores TERM altogether until docker's SIGKILL); its
inner launcher (deepspeed.launcher.launch) answers TERM by terminating every rank, which then saves, but
exits 1 regardless, and a USR1 kills it outright. The ranks' own handler (engine/trainer.py: finish the
step, agree, save, exit 0) is right; what is missing is a process that delivers the signal to them and
reports their outcome rather than the launcher's.

How:
- The command runs in a session of its own: a signal to the supervisor's process group (a terminal's
  Ctrl-C, `kill -TERM -PGID`) reaches the supervisor only.
- Each rank registers its pid in a status directory (STATUS_DIR_ENV, set for the command) once its
  preemption handler is installed, and at the end writes its exit code there (`register`, `report`).
- TERM / USR1 to the supervisor go to the registered ranks as they are, the first INT as TERM (a second
  INT goes to them as INT: they abort at once, engine/run_guard.py). Before any rank has
  registered there is nothing to save, and the signal goes to the command's whole session.
- When the command ends while ranks still run (the launcher was killed, or exited after a signal of its
  own), the ranks are sent TERM (or the signal that killed the launcher) and awaited. The supervisor is a
  child subreaper, so launchers and ranks orphaned on the way are its children and reaped (as PID 1 too).
- Exit status: 0 when every rank of the world reported 0; otherwise the command's (128 + N if killed by
  signal N), or 1.

Stdlib only: it must start fast and never import torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATUS_DIR_ENV = "SECO_STATUS_DIR"
_FIRST_INT = (
    "Ctrl-C: the ranks finish their step, save a checkpoint and stop; a second Ctrl-C aborts them at once"
)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


# ------------------------------------------------------------------------------------ the ranks' side


def register(rank: int, world_size: int) -> None:
    """Called by each rank once its preemption handler is installed (launch/train.py); no-op unsupervised."""
    root = os.environ.get(STATUS_DIR_ENV)
    if root and Path(root).is_dir():
        _write(Path(root) / f"rank{rank}.pid", f"{os.getpid()} {world_size}")


def report(rank: int, code: int) -> None:
    """The rank's exit code, written just before it exits (only once registered)."""
    root = os.environ.get(STATUS_DIR_ENV)
    if root and (Path(root) / f"rank{rank}.pid").is_file():
        _write(Path(root) / f"rank{rank}.exit", str(code))


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the supervisor never reads half a file


# ---------------------------------------------------------------------------------- the supervisor


def supervise(cmd: list[str], poll_s: float = 0.1) -> int:
    """Run `cmd` (e.g. ["deepspeed", "--num_gpus", "8", "launch/train.py", ...]) under the rules above."""
    status = Path(tempfile.mkdtemp(prefix="seco-status-"))
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in FORWARDED}
    _become_subreaper()
    try:
        child = subprocess.Popen(cmd, env={**os.environ, STATUS_DIR_ENV: str(status)}, start_new_session=True)
        child_code: int | None = None
        asked = interrupted = False
        while True:
            child_code = _reap(child.pid, child_code)
            ranks = _alive_ranks(status)
            while pending:
                sig = pending.pop(0)
                if ranks:
                    _send(ranks, signal.SIGTERM if sig == signal.SIGINT and not interrupted else sig)
                    if sig == signal.SIGINT and not interrupted:
                        interrupted = True
                        print(_FIRST_INT, file=sys.stderr, flush=True)
                elif child_code is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child.pid, sig)
            if child_code is not None:
                if not ranks:
                    break
                if not asked:  # the launcher is gone and ranks run on: they save and stop
                    killed_by = -child_code if child_code < 0 else None
                    _send(
                        ranks, killed_by if killed_by in (signal.SIGTERM, signal.SIGUSR1) else signal.SIGTERM
                    )
                    asked = True
            time.sleep(poll_s)
        child.returncode = child_code  # reaped here, not by Popen
        if _world_reported_success(status):
            return 0
        if child_code == 0:
            return 1  # the launcher exited 0 but a rank did not report success
        return 128 - child_code if child_code < 0 else child_code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(status, ignore_errors=True)


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap(child_pid: int, child_code: int | None) -> int | None:
    """Collect every ended child (the command, and orphans re-parented to us); the command's exit code."""
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return child_code
        if pid == 0:
            return child_code
        if pid == child_pid:
            child_code = os.waitstatus_to_exitcode(st)


def _alive_ranks(status: Path) -> list[int]:
    pids = []
    for f in status.glob("rank*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(f.read_text().split()[0])
            if _alive(pid):
                pids.append(pid)
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended: only its parent has not collected it yet


def _send(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _world_reported_success(status: Path) -> bool:
    worlds = set()
    for f in status.glob("rank*.pid"):
        with contextlib.suppress(ValueError, OSError, IndexError):
            worlds.add(int(f.read_text().split()[1]))
    if len(worlds) != 1:
        return False
    (world,) = worlds
    for rank in range(world):
        f = status / f"rank{rank}.exit"
        if not f.is_file() or f.read_text().strip() != "0":
            return False
    return True
