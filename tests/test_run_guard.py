"""The launcher chain of engine/run_guard.py on small process trees (no torch): a fake launcher (a script
named preemptible.py) and a rank under it. The rank's chain breaks when the launcher is SIGKILLed, and does
not when only the launcher's own parent goes (`nohup deepspeed ... &` and a logout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RANK = """
import sys, time
sys.path.insert(0, {repo!r})
from engine import run_guard
chain = run_guard.launcher_chain()
print(" ".join(str(link.pid) for link in chain), flush=True)
for _ in range(200):
    reason = run_guard.broken(chain)
    if reason:
        print("broken:", reason, flush=True)
        break
    time.sleep(0.05)
else:
    print("holds", flush=True)
"""

LAUNCHER = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", {rank!r}], stdout=open({out!r}, "w"))
print(rank.pid, flush=True)
rank.wait()
"""


def start(tmp_path: Path, wrapped: bool) -> tuple[subprocess.Popen, int, int, Path]:
    """(outer process, launcher pid, rank pid, rank's output); `wrapped`: a plain shell above the launcher."""
    out = tmp_path / "rank.out"
    launcher = tmp_path / "preemptible.py"  # the name makes it a launcher
    launcher.write_text(LAUNCHER.format(rank=RANK.format(repo=str(REPO)), out=str(out)))
    cmd = [sys.executable, str(launcher)]
    if wrapped:  # sh -> launcher -> rank; sh reports the launcher's pid (its command line names no launcher)
        (tmp_path / "wrapper.sh").write_text(f"{sys.executable} {launcher} & echo $!; wait\n")
        cmd = ["sh", str(tmp_path / "wrapper.sh")]
    outer = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    first = int(outer.stdout.readline())
    if wrapped:
        launcher_pid, rank_pid = first, int(outer.stdout.readline())
    else:
        launcher_pid, rank_pid = outer.pid, first
    deadline = time.time() + 30
    while not (out.exists() and out.read_text().strip()):
        assert time.time() < deadline
        time.sleep(0.02)
    return outer, launcher_pid, rank_pid, out


def wait_line(out: Path, n: int, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while len(out.read_text().splitlines()) < n:
        assert time.time() < deadline, out.read_text()
        time.sleep(0.02)
    return out.read_text().splitlines()[n - 1]


def test_chain_breaks_when_the_launcher_is_killed(tmp_path):
    outer, launcher_pid, rank_pid, out = start(tmp_path, wrapped=False)
    try:
        assert wait_line(out, 1) == str(launcher_pid)  # the chain: the launcher only (pytest is none)
        os.kill(launcher_pid, signal.SIGKILL)
        assert wait_line(out, 2).startswith(f"broken: its launcher ended ('{sys.executable}")
        assert f"pid {launcher_pid})" in wait_line(out, 2)
    finally:
        outer.kill()
        outer.wait()


def test_outermost_launcher_losing_its_parent_ends_nothing(tmp_path):
    outer, launcher_pid, rank_pid, out = start(tmp_path, wrapped=True)
    try:
        assert wait_line(out, 1) == str(launcher_pid)  # the shell above the launcher is not watched
        outer.kill()  # the shell goes; the launcher is re-parented and goes on
        outer.wait()
        assert wait_line(out, 2, timeout=60) == "holds"
    finally:
        for pid in (launcher_pid, rank_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_no_launcher_no_chain():
    from engine import run_guard

    assert run_guard.launcher_chain() == []  # pytest and its shell are no launchers
