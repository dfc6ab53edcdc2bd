"""A one-rank training run inside the test process, and a free port for a rendezvous."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from unittest import mock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def trained_run(config: Path, overrides: list[str], root: Path) -> Iterator:
    """The run of `config` with `overrides` after its loop, `root` attached; closed on exit. The process
    group stays up while the context is open: callers load into this engine."""
    from engine import trainer
    from engine.config_load import load_config

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    with mock.patch.dict(os.environ, {**env, "MASTER_PORT": str(free_port())}):
        run = trainer.setup(load_config(str(config), overrides))
        try:
            trainer.run_loop(run)
            run.root = root
            yield run
        finally:
            trainer.close(run)
