"""Preemption through the real `deepspeed` launcher: 2 CPU ranks under launch/preemptible.py;
a TERM to the supervisor (what `docker stop` sends to the image's PID 1), to the `deepspeed` runner, or to
the runner's whole process group -> every rank finishes its step, the checkpoint is saved, exit 0.

tests/hostile_cases.py runs the same for the inner launcher and for USR1 too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from one_rank import free_port

REPO = Path(__file__).resolve().parents[1]


def preemptible_run(root: Path, steps: int = 200) -> subprocess.Popen:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [sys.executable, str(REPO / "launch" / "preemptible.py"), str(deepspeed), "--num_gpus", "2"]
    cmd += ["--master_port", str(free_port()), str(REPO / "launch" / "train.py")]
    cmd += ["--config", str(REPO / "configs" / "tiny-cpu.yaml"), f"--logging.dir={root}/log"]
    cmd += [f"--checkpoint.dir={root}/ckpt", "--data.seq_len=128", "--chunking.chunk_size=64"]
    cmd += [f"--optim.steps={steps}", "--optim.warmup_steps=0", "--data.num_samples=64"]
    cmd += ["--logging.progress_bar=false", "--logging.tensorboard=false"]
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "out.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_for_steps(root: Path, proc: subprocess.Popen, n: int, timeout: float = 400) -> None:
    log, deadline = root / "log" / "metrics.jsonl", time.time() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.time() < deadline, (root / "out.log").read_text()[-3000:]
        time.sleep(0.05)


def signal_target(proc: subprocess.Popen, target: str, sig: int) -> None:
    runner = psutil.Process(proc.pid).children()[0]  # `deepspeed` (deepspeed/launcher/runner.py)
    inner = runner.children()[0]  # python -m deepspeed.launcher.launch: the ranks' parent
    assert "deepspeed.launcher.launch" in inner.cmdline()
    if target == "supervisor":
        os.kill(proc.pid, sig)
    elif target == "deepspeed":
        os.kill(runner.pid, sig)
    elif target == "launcher":
        os.kill(inner.pid, sig)
    else:
        assert target == "group"
        os.killpg(os.getpgid(runner.pid), sig)


def check_preempted(root: Path, code: int, signame: str) -> int:
    out = (root / "out.log").read_text()
    assert code == 0, out[-3000:]
    steps = len((root / "log" / "metrics.jsonl").read_text().splitlines())
    assert 2 <= steps < 200, steps
    assert (root / "ckpt" / "latest").read_text() == f"global_step{steps}"
    assert (root / "ckpt" / f"global_step{steps}" / "rng_rank1.pt").is_file()
    # A TERM to the runner also ends the job under the ranks: their launcher watch may see it first.
    causes = (
        f"preempted by {signame}",
        "preempted by a signal to another rank",
        "preempted by the end of the job",
    )
    assert any(c in out for c in causes)
    return steps


@pytest.mark.distributed
@pytest.mark.parametrize("target", ["supervisor", "deepspeed", "group"])
def test_sigterm_through_deepspeed_launcher_saves_and_exits_0(tmp_path, target):
    proc = preemptible_run(tmp_path)
    wait_for_steps(tmp_path, proc, 2)
    signal_target(proc, target, signal.SIGTERM)
    check_preempted(tmp_path, proc.wait(timeout=300), "SIGTERM")


def test_a_repeated_signal_after_the_preemption_save_cannot_kill_the_rank():
    """The race CI hit with TERM to the launcher's process group: DeepSpeed's inner launcher terminates the
    ranks one by one, so rank 1 got a second TERM after its save, in close(), and died by it (exit 143)."""
    from types import SimpleNamespace

    from engine import trainer

    before = {s: signal.getsignal(s) for s in trainer.PREEMPT_SIGNALS}
    try:
        for s in trainer.PREEMPT_SIGNALS:
            signal.signal(s, trainer._request_stop)  # as setup() leaves them
        run = SimpleNamespace(
            metrics=SimpleNamespace(close=lambda: None), stopping=True, watch=None, claim=None
        )
        run.signals = {s: signal.SIG_DFL for s in trainer.PREEMPT_SIGNALS}  # what a fresh process had
        trainer.close(run)
        assert all(signal.getsignal(s) == trainer._request_stop for s in trainer.PREEMPT_SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's late TERM: must not end this process
        time.sleep(0.1)
        run.stopping = False  # a run that ended normally gives its handlers back
        trainer._PREEMPT.clear()
        trainer.close(run)
        assert all(signal.getsignal(s) == signal.SIG_DFL for s in trainer.PREEMPT_SIGNALS)
    finally:
        trainer._PREEMPT.clear()
        for s, h in before.items():
            signal.signal(s, h)
