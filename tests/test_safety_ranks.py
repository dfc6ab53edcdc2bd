"""Ranks never outlive their job and agree before they wait: 2 CPU ranks through the real `deepspeed`
launcher (or started srun-style, one process per rank), each with a free --master_port.

- one rank's preparation fails: every rank ends within seconds, each with one `error:` line;
- a second run on a locked checkpoint.dir: refused on every rank, naming the holder;
- MASTER_PORT in use: one line naming it, exit 2;
- the bare `deepspeed` runner TERMed, the supervisor SIGKILLed: the ranks notice, save and exit;
- Ctrl-C: the first saves and stops (exit 0), a second aborts (exit 130).

tests/hostile_cases.py replays these and the runner / inner launcher SIGKILL cases."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from one_rank import free_port, outputs, taken_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
FAST = ["--data.seq_len=128", "--chunking.chunk_size=64", "--data.num_samples=64", "--optim.warmup_steps=0"]
FAST += ["--logging.progress_bar=false", "--logging.tensorboard=false"]
CLEAN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {
    **{k: v for k, v in os.environ.items() if k not in CLEAN},
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


def deepspeed_cmd(root: Path, *args: str, port: int | None = None) -> list[str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port or free_port()), str(TRAIN)]
    return [*cmd, "--config", str(CONFIG), *FAST, *outputs(root), *args]


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def steps_logged(root: Path) -> int:
    log = root / "log" / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def wait_for_steps(root: Path, proc: subprocess.Popen, n: int, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while steps_logged(root) < n:
        assert proc.poll() is None and time.time() < deadline, (root / "out.log").read_text()[-3000:]
        time.sleep(0.05)


# ------------------------------------------------------------------------------- agree before waiting


def test_one_ranks_failure_ends_every_rank(tmp_path):
    """srun-style ranks (no launcher kills the survivors): rank 1's data file is empty. Rank 0 prepared
    fine and would wait in the process group's rendezvous until its timeout; it ends as soon as rank 1 has."""
    (tmp_path / "empty.jsonl").write_text("")
    port, procs = str(free_port()), []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        data = ["--data.kind=jsonl", f"--data.path={tmp_path}/empty.jsonl"] if rank == 1 else []
        cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(tmp_path), *data]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        )
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    codes = [p.returncode for p in procs]
    assert codes == [2, 2], outs
    # Errors are said once per node (by local rank 0): rank 0 relays rank 1's.
    assert errors(outs[0]) == [errors(outs[0])[-1]] and not errors(outs[1])
    assert errors(outs[0])[-1].startswith("error: rank 1 failed: jsonl data") and "empty.jsonl" in outs[0]
    assert (
        not (tmp_path / "ckpt").exists() and not (tmp_path / "log").exists()
    )  # a failed start writes nothing


def test_master_port_in_use_is_one_line(tmp_path):
    with taken_port() as port:
        env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST, *outputs(tmp_path)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert errors(r.stderr) == [f"error: MASTER_PORT {port} is in use on this host (MASTER_ADDR 127.0.0.1): another job listens there; choose a free port (deepspeed --master_port N, torchrun --master_port N, or MASTER_PORT)"]  # fmt: skip
    assert "Traceback" not in r.stderr


@pytest.mark.distributed
def test_locked_checkpoint_dir_refuses_every_rank(tmp_path):
    from engine import run_lock

    lock = run_lock.acquire(tmp_path / "ckpt", "checkpoint.dir")  # this process plays the running job
    try:
        t0 = time.time()
        r = subprocess.run(deepspeed_cmd(tmp_path), capture_output=True, text=True, timeout=300, env=ENV)
    finally:
        lock.release()
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    holder = f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}"
    assert [holder in line for line in errors(out)] == [True], errors(out)  # said once per node
    assert time.time() - t0 < 200 and not (tmp_path / "log").exists()


# ------------------------------------------------------------------------------- no orphan trains on


def ranks_of(launcher_pid: int) -> list[psutil.Process]:
    inner = [p for p in psutil.Process(launcher_pid).children(recursive=True) if "deepspeed.launcher.launch" in " ".join(p.cmdline())]  # fmt: skip
    assert len(inner) == 1
    ranks = inner[0].children()
    assert len(ranks) == 2
    return ranks


def check_stopped(root: Path, ranks: list[psutil.Process], timeout: float = 240) -> int:
    gone, alive = psutil.wait_procs(ranks, timeout=timeout)
    for p in alive:
        p.kill()
    out = (root / "out.log").read_text()
    assert not alive, f"ranks {[p.pid for p in alive]} still training: " + out[-3000:]
    steps = steps_logged(root)
    assert 2 <= steps < 300
    assert (root / "ckpt" / "latest").read_text() == f"global_step{steps}", out[-3000:]
    assert (root / "ckpt" / f"global_step{steps}" / "rng_rank1.pt").is_file()
    # Rank 0 names its own cause; when rank 1's watch saw the launcher go first, rank 0 stops for that rank.
    causes = ("preempted by the end of the job: its launcher", "preempted by a signal to another rank")
    assert any(c in out for c in causes) and f"preempted: steps 1..{steps}" in out, out[-3000:]
    assert out.count("exits successfully") == 2  # the inner launcher, still there, saw both ranks exit 0
    time.sleep(2)
    assert steps_logged(root) == steps  # nothing trains on
    return steps


@pytest.mark.distributed
def test_sigterm_to_the_bare_deepspeed_runner_saves_on_every_rank(tmp_path):
    """The runner has no TERM handler (it ends with 143 at once); its ranks notice and stop as under TERM."""
    root = tmp_path
    root.mkdir(exist_ok=True)
    cmd = deepspeed_cmd(root, "--optim.steps=300")
    proc = subprocess.Popen(cmd, stdout=open(root / "out.log", "w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)  # fmt: skip
    wait_for_steps(root, proc, 2)
    ranks = ranks_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # the runner's own status: 143 from a shell
    check_stopped(root, ranks)


@pytest.mark.distributed
def test_sigkill_of_the_supervisor_leaves_no_orphan(tmp_path):
    root = tmp_path
    deepspeed = deepspeed_cmd(root, "--optim.steps=300")
    cmd = [sys.executable, str(REPO / "launch" / "preemptible.py"), *deepspeed]
    proc = subprocess.Popen(cmd, stdout=open(root / "out.log", "w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)  # fmt: skip
    wait_for_steps(root, proc, 2)
    ranks = ranks_of(proc.pid)
    proc.kill()
    proc.wait()
    check_stopped(root, ranks)


# ------------------------------------------------------------------------------------------------ Ctrl-C


def plain_run(root: Path, *args: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(TRAIN),
        "--config",
        str(CONFIG),
        *FAST,
        *outputs(root),
        "--optim.steps=300",
        *args,
    ]
    return subprocess.Popen(cmd, stdout=open(root / "out.log", "w"), stderr=subprocess.STDOUT, env=ENV)


def test_first_ctrl_c_saves_and_stops(tmp_path):
    proc = plain_run(tmp_path)
    wait_for_steps(tmp_path, proc, 2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, (tmp_path / "out.log").read_text()[-3000:]
    out, steps = (tmp_path / "out.log").read_text(), steps_logged(tmp_path)
    assert "a second Ctrl-C aborts at once" in out and "preempted by SIGINT" in out and "Traceback" not in out
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{steps}"


def test_second_ctrl_c_aborts(tmp_path):
    proc = plain_run(tmp_path, "--data.seq_len=4096", "--chunking.chunk_size=256")  # steps of about a second
    wait_for_steps(tmp_path, proc, 2)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while "a second Ctrl-C aborts" not in (tmp_path / "out.log").read_text():  # the first one was handled
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    assert "aborted by a second Ctrl-C" in (tmp_path / "out.log").read_text()
