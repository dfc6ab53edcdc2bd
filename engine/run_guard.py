"""Ranks never outlive their job, and Ctrl-C saves.

The launcher chain: the processes between a rank and its outermost launcher (DeepSpeed's inner launcher
`deepspeed.launcher.launch` and its runner `deepspeed`, launch/preemptible.py, torchrun, mpirun's daemons,
slurmstepd), recorded at start-up from /proc with each one's parent and start time. When any of them ends or
is re-parented (its launcher above it was killed: `kill -9` of the runner or the supervisor, a TERM to the
bare `deepspeed` runner, which has no handler of its own), the job is gone and nobody would stop the ranks:
they would train on as orphans, and a restarted job would write into the same directory. A watch thread
checks the chain twice a second and then requests the same stop a TERM requests (finish the step, agree,
save, exit 0). Processes above the outermost launcher (the user's shell, nohup, tmux) are not watched.

Ctrl-C (SIGINT): the first one requests that stop too, and says so; a second one, or one arriving when a
stop was already requested, aborts at once (exit 130, nothing saved since the last checkpoint).

Linux /proc; elsewhere only the rank's own parent is watched (os.getppid). A rank started without a
launcher (`python launch/train.py`, or by a process manager that is none of the above) watches nothing.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

# What a launcher's command line contains (argv joined by spaces).
LAUNCHER_RE = re.compile(
    r"deepspeed\.launcher\.(launch|runner)|(^|[ /])deepspeed( |$)|preemptible\.py|engine\.supervise"
    r"|torch\.distributed\.(run|launch)|(^|[ /])torchrun( |$)"
    r"|(^|[ /])(mpirun|mpiexec|orted|prted|prterun|hydra_pmi_proxy|slurmstepd)( |$|:)"
)
_MAX_DEPTH = 32
POLL_S = 0.5


@dataclass(frozen=True)
class Link:
    pid: int
    ppid: int
    start: str  # /proc start time: a reused pid is not the same process
    name: str


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, start time) of `pid`, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def launcher_chain(pid: int | None = None) -> list[Link]:
    """The ancestors of `pid` (default: this process) up to its outermost launcher; [] without one."""
    chain: list[Link] = []
    outermost = -1
    current = _stat(pid or os.getpid())
    while current is not None and current[1] > 1 and len(chain) < _MAX_DEPTH:
        parent = current[1]
        st = _stat(parent)
        if st is None:
            break
        cmd = _cmdline(parent)
        chain.append(Link(parent, st[1], st[2], " ".join(cmd.split(" ")[:3])[:120]))
        if LAUNCHER_RE.search(cmd):
            outermost = len(chain)
        current = st
    return chain[:outermost] if outermost > 0 else []


def broken(chain: list[Link]) -> str | None:
    """Why the chain no longer holds (a link ended, or one below the outermost lost its parent), or None.
    The outermost launcher may be re-parented (`nohup deepspeed ... &` and a logout): that ends nothing."""
    for i, link in enumerate(chain):
        st = _stat(link.pid)
        if st is None or st[0] in ("Z", "X") or st[2] != link.start:
            return f"its launcher ended ({link.name!r}, pid {link.pid})"
        if st[1] != link.ppid and i < len(chain) - 1:
            return f"its launcher's parent ended ({link.name!r}, pid {link.pid}, lost its parent pid {link.ppid})"
    return None


class LauncherWatch:
    """A daemon thread calling `on_lost(reason)` once, when the launcher chain breaks."""

    def __init__(self, on_lost: Callable[[str], None], poll_s: float = POLL_S) -> None:
        self.chain = launcher_chain() if Path("/proc/self/stat").exists() else None
        self._ppid = os.getppid()
        self._on_lost, self._poll_s = on_lost, poll_s
        self._stop = threading.Event()
        if self.chain != []:  # nothing to watch without a launcher
            threading.Thread(target=self._watch, name="seco-launcher-watch", daemon=True).start()

    def _check(self) -> str | None:
        if self.chain is None:  # no /proc: the parent only
            return f"its parent process ended (pid {self._ppid})" if os.getppid() != self._ppid else None
        return broken(self.chain)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            reason = self._check()
            if reason is not None:
                self._on_lost(reason)
                return

    def stop(self) -> None:
        self._stop.set()


def interrupt_handler(stop: MutableMapping, announce: bool) -> Callable:
    """The SIGINT handler: the first Ctrl-C sets `stop` as a TERM does (and says so when `announce`); with
    a stop already requested, Ctrl-C aborts at once."""

    def handler(signum, frame) -> None:
        if stop:
            print(
                "aborted by a second Ctrl-C (nothing saved since the last checkpoint)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signal.SIGINT)
        stop["signum"] = signum
        if announce:
            print(
                "Ctrl-C: finishing this step, saving a checkpoint and stopping; a second Ctrl-C aborts at once",
                file=sys.stderr,
                flush=True,
            )

    return handler
