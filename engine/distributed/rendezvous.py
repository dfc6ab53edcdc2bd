"""Every rank agrees before it waits: the ranks meet in the rendezvous store (the TCPStore at
MASTER_ADDR:MASTER_PORT that the process group is then built on) *before* their preparation, and after it
each posts a verdict, ready or failed. A rank whose data, tokenizer or checkpoint is unusable thus ends every
rank within seconds of the last one's preparation, each with one `error:` line, instead of leaving the others
in the process group's rendezvous until its timeout (under srun / mpirun without kill-on-bad-exit, a job that
never ends).

Meeting first also makes a taken MASTER_PORT one line: rank 0 cannot serve the store there (exit 2, naming
the port), and a rank that reaches another job's store finds its rendezvous full (exit 2 as well).

Under torchrun the elastic agent serves the store (TORCHELASTIC_USE_AGENT_STORE) and every rank is a client;
under mpirun without RANK in the environment DeepSpeed's MPI discovery (mpi4py) supplies the addresses first.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")
_POLL_S = 0.1
_GRACE_S = 3.0  # rank 0, after the others have read a failure: time for them to report theirs


class PeerFailed(ValueError):
    """Another rank failed its preparation (its own error is on its output), or the rendezvous is unusable."""


class Rendezvous:
    """The store and this rank's place in it; `agreed` runs the preparation under the verdict exchange."""

    def __init__(self, store: Any, rank: int, world: int, serves: bool, timeout: timedelta) -> None:
        self.store, self.rank, self.world, self.serves, self.timeout = store, rank, world, serves, timeout
        self.prefix = f"seco/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def agreed(self, prepare: Callable[[], T], undo: Callable[[T], None] | None = None) -> T:
        """prepare(), then wait until every rank has prepared; any rank's failure ends every rank (PeerFailed
        on the others, after undo(what this rank prepared))."""
        if self.store is None:
            return prepare()
        try:
            result = prepare()
        except BaseException as e:
            try:  # a user error (ValueError, OSError: exit 2) as its message, anything else with its type
                what = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
                self._post(f"failed: {what}"[:2000])
                self._finish(self._verdicts(), own_failure=True)
            except Exception:  # the exchange failing must not hide this rank's own error
                pass
            finally:
                self.store = None  # the server (rank 0) closes: its port is free again
            raise
        self._post("ok")
        try:
            self._finish(self._verdicts(), own_failure=False)
        except PeerFailed:
            self.store = None
            if undo is not None:
                undo(result)
            raise
        return result

    def _post(self, verdict: str) -> None:
        self.store.set(f"{self.prefix}verdict/{self.rank}", verdict)

    def _verdicts(self) -> dict[int, str]:
        """Every rank's verdict, or as soon as one has failed (polling: the others may still prepare)."""
        deadline, got = time.monotonic() + self.timeout.total_seconds(), {}
        try:
            while len(got) < self.world:
                for r in range(self.world):
                    key = f"{self.prefix}verdict/{r}"
                    if r not in got and self.store.check([key]):
                        got[r] = self.store.get(key).decode("utf-8", "replace")
                if any(v != "ok" for v in got.values()):
                    return got
                if time.monotonic() > deadline:
                    missing = [r for r in range(self.world) if r not in got]
                    raise PeerFailed(
                        f"ranks {missing} did not finish preparing within {self.timeout} (DEEPSPEED_TIMEOUT "
                        "minutes): they are hung or were never started"
                    )
                if len(got) < self.world:
                    time.sleep(_POLL_S)
        except dist.DistError as e:  # the store went away: rank 0 ended (its own error says why)
            raise PeerFailed(
                f"the rendezvous store at {_address()} went away ({e}); rank 0 has ended"
            ) from None
        return got

    def _finish(self, verdicts: dict[int, str], own_failure: bool) -> None:
        failed = {r: v for r, v in verdicts.items() if v != "ok"}
        if not failed:
            return
        if self.serves:  # the others read the verdicts from this process: stay until they have
            self._wait_for_acks(set(range(self.world)) - {self.rank})
        else:
            try:
                self.store.set(f"{self.prefix}ack/{self.rank}", "1")
            except dist.DistError:
                pass
        if not own_failure:
            r, v = min(failed.items())
            raise PeerFailed(f"rank {r} {v} (every rank stops before the run starts)")

    def _wait_for_acks(self, ranks: set[int]) -> None:
        """Until every other rank has read the verdicts (a rank still preparing will come: as long as for a
        verdict). A TERM / INT meanwhile (a launcher ending the job) ends the wait, not the process, so that
        this rank's own error is still reported."""
        deadline, ended = time.monotonic() + self.timeout.total_seconds(), []
        in_main = threading.current_thread() is threading.main_thread()
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = (
            {s: signal.signal(s, lambda signum, frame: ended.append(signum)) for s in stops}
            if in_main
            else {}
        )
        try:
            while ranks and not ended and time.monotonic() < deadline:
                ranks = {r for r in ranks if not self.store.check([f"{self.prefix}ack/{r}"])}
                time.sleep(_POLL_S)
            # The others print their error after their ack: let them, before a launcher that sees this
            # rank exit terminates them (DeepSpeed's does, on the first non-zero exit).
            grace = time.monotonic() + _GRACE_S
            while not ended and time.monotonic() < grace:
                time.sleep(_POLL_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def join(timeout: timedelta) -> Rendezvous:
    """Meet the other ranks in the rendezvous store (rank 0, or torchrun's agent, serves it). Without
    MASTER_PORT (`python launch/train.py`, a world of one) there is nobody to meet: no store."""
    if dist.is_initialized():  # a caller that built the process group itself (tests): nothing to agree
        return Rendezvous(None, dist.get_rank(), dist.get_world_size(), False, timeout)
    _discover_mpi()
    if "MASTER_PORT" not in os.environ:  # a world of one without a launcher: nobody to agree with
        return Rendezvous(None, 0, 1, False, timeout)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    serves = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True)
    try:
        store = dist.TCPStore(
            addr, port, world, is_master=serves, timeout=timeout, wait_for_workers=False, multi_tenant=True
        )
    except dist.DistNetworkError as e:
        if serves and "EADDRINUSE" in str(e):
            raise ValueError(
                f"MASTER_PORT {port} is in use on this host (MASTER_ADDR {addr}): another job listens there; "
                "choose a free port (deepspeed --master_port N, torchrun --master_port N, or MASTER_PORT)"
            ) from None
        raise ValueError(
            f"cannot reach the rendezvous at {addr}:{port} (MASTER_ADDR:MASTER_PORT): {e}"
        ) from None
    rdzv = Rendezvous(store, rank, world, serves, timeout)
    joined = store.add(f"{rdzv.prefix}joined", 1)
    if joined > world:
        raise ValueError(
            f"MASTER_PORT {port} is in use: the rendezvous at {addr}:{port} already has its {world} ranks "
            "(another job's); choose a free port (deepspeed --master_port N, or MASTER_PORT)"
        )
    return rdzv


def _discover_mpi() -> None:
    """Under mpirun without RANK etc.: DeepSpeed's MPI discovery sets them (and MASTER_ADDR / MASTER_PORT)."""
    from engine.distributed.runtime import mpi_world_size, remember_rank_env

    if "RANK" in os.environ or mpi_world_size() is None:
        return
    from deepspeed.comm.comm import mpi_discovery

    remember_rank_env()  # discovery writes RANK etc.: shutdown restores them

    # MPI discovery would otherwise reset MASTER_PORT to 29500: two jobs on a node would collide.
    mpi_discovery(distributed_port=int(os.environ.get("MASTER_PORT", 29500)), verbose=False)


def _address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '?')}"
