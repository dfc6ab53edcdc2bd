"""Harness of the tests that run the trainer: a one-rank run inside the test process, launch/train.py as a
module or a command line, free and taken ports for a rendezvous, the run directories under a test's root, and another process
holding a run directory's lock."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def rank_zero_of_one() -> dict[str, str]:
    """The rank variables a launcher gives the one rank of a world of one, with a free rendezvous port."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    return {**env, "MASTER_PORT": str(free_port())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port another listener holds while the context is open (a MASTER_PORT in use)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from engine import run_lock
run_lock.acquire({d!r}, "checkpoint.dir")
print("held", flush=True)
time.sleep(900)
"""


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s run lock (as a run's rank 0 does) until it is killed."""
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=str(REPO), d=str(directory))], stdout=subprocess.PIPE
    )
    assert p.stdout.readline().strip() == b"held"
    return p


def outputs(root: Path) -> list[str]:
    """The overrides that put a run's logging.dir and checkpoint.dir under `root`."""
    return [f"--logging.dir={root}/log", f"--checkpoint.dir={root}/ckpt"]


def train_cmd(*args: str, config: Path = TINY_CONFIG) -> list[str]:
    """The command line of a launch/train.py run of `config` with `args` (overrides) in a subprocess."""
    return [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(config), *args]


def launcher():
    """launch/train.py as a module (it is a script, not a package module): its main() runs in this process."""
    spec = importlib.util.spec_from_file_location("seco_launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def trained_run(config: Path, overrides: list[str], root: Path) -> Iterator:
    """The run of `config` with `overrides` after its loop, `root` attached; closed on exit. The process
    group stays up while the context is open: callers load into this engine."""
    from engine import trainer
    from engine.config_load import load_config

    with mock.patch.dict(os.environ, rank_zero_of_one()):
        run = trainer.setup(load_config(str(config), overrides))
        try:
            trainer.run_loop(run)
            run.root = root
            yield run
        finally:
            trainer.close(run)
