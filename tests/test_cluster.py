"""Cluster launch paths: mpirun, multi-node through the deepspeed launcher, Slurm with preemption and requeue,
a dead rank, and the Docker image's pins.

Every run trains the same tiny two-rank job, and every one of them must log the losses of one plain
`deepspeed --num_gpus 2` run (read back from logging.dir/metrics.jsonl), including the Slurm job that is
preempted twice and resumed from its checkpoints.

Tests needing a tool skip when it is missing (mpirun + mpi4py: `pip install -e .[mpi]`; Slurm:
`eval "$(scripts/cluster/slurm-up.sh)"`); with SECO_CLUSTER_REQUIRED=1 (.ci/cluster) they fail instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from one_rank import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
DOCKERFILE = REPO / "docker" / "Dockerfile"
REQUIRED = os.environ.get("SECO_CLUSTER_REQUIRED") == "1"

# Enough steps (~0.1 s each after the first) for a signal sent after step 1 to land mid-run.
STEPS = 80
TINY = [
    "--data.seq_len=256",
    "--chunking.chunk_size=64",
    f"--optim.steps={STEPS}",
    "--checkpoint.every=null",
    "--logging.progress_bar=false",
    "--logging.tensorboard=false",
]
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"SECO_CLUSTER_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def run_args(out: Path) -> list[str]:
    return ["--config", str(CONFIG), *TINY, f"--logging.dir={out}", f"--checkpoint.dir={out}/ckpt"]


def losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records}


def assert_same_curve(got: dict[int, float], ref: dict[int, float]):
    assert sorted(got) == list(range(1, STEPS + 1)), f"steps logged: {sorted(got)}"
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    assert worst <= 1e-6, f"losses differ from the single-node run (max rel. diff {worst:.2e})"


def deepspeed_cmd(*launcher_args: str) -> list[str]:
    exe = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    return [exe, *launcher_args]


def wait_for_step(out: Path, step: int, ended=lambda: None, timeout: float = 240):
    """Until metrics.jsonl has `step`; `ended()` returns a description once the run is over."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(losses(out), default=0) >= step:
            return
        if (why := ended()) is not None:
            raise AssertionError(f"the run ended ({why}) before step {step}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {out}/metrics.jsonl after {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Losses of the plain single-node run: `deepspeed --num_gpus 2` on CPU ranks."""
    out = tmp_path_factory.mktemp("reference")
    cmd = deepspeed_cmd("--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *run_args(out))
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


# --------------------------------------------------------------------------------------------- MPI


def mpirun() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        unavailable("mpi4py is not installed (pip install -e '.[mpi]')")
    exe = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if exe is None:
        unavailable("no mpirun (pip install -e '.[mpi]' brings Open MPI's)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version:
        unavailable(f"mpirun is not Open MPI's: {version.splitlines()[:1]}")
    return exe


@pytest.mark.mpi
def test_mpirun_two_ranks_match_single_node(tmp_path, reference):
    """`mpirun -np 2 python launch/train.py`: ranks and rendezvous from DeepSpeed's MPI discovery (mpi4py)."""
    exe = mpirun()
    # DeepSpeed's discovery takes the master address from `hostname -I`: keep the rendezvous on loopback.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "hostname").write_text(
        '#!/bin/sh\n[ "$1" = -I ] && { echo 127.0.0.1; exit 0; }\nexec /bin/hostname "$@"\n'
    )
    (shim / "hostname").chmod(0o755)
    env = {**ENV, "PATH": f"{shim}:{ENV['PATH']}"}
    out = tmp_path / "run"
    cmd = [exe, "-np", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,sm"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, str(TRAIN), *run_args(out)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"mpirun -np 2: {time.monotonic() - t0:.0f} s")
    assert f"done: steps 1..{STEPS}" in r.stdout
    assert_same_curve(losses(out), reference)
    assert (out / "ckpt" / "latest").read_text().strip() == f"global_step{STEPS}"


# -------------------------------------------------------------------------------- deepspeed launcher


@pytest.mark.distributed
def test_two_nodes_without_ssh_match_single_node(tmp_path, reference):
    """Two `deepspeed --no_ssh --node_rank N` launchers (one per "node", one rank each) on this machine.

    --num_nodes 2 needs a hostfile even without ssh (the launcher only reads the node names and slots)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out, port = tmp_path / "run", str(free_port())
    procs = []
    for node in range(2):
        cmd = deepspeed_cmd(
            "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--num_gpus", "1",
            "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
            str(TRAIN), *run_args(out),
        )  # fmt: skip
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "WORLD INFO DICT: {'node0': [0], 'node1': [0]}" in logs[0]
    assert_same_curve(losses(out), reference)


def rank_pid(launcher: subprocess.Popen, local_rank: int, timeout: float = 60) -> int:
    import psutil  # a DeepSpeed dependency

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if str(TRAIN.relative_to(REPO)) in " ".join(cmdline) or str(TRAIN) in cmdline:
                if f"--local_rank={local_rank}" in cmdline:
                    return child.pid
        time.sleep(0.2)
    raise AssertionError(f"no rank with --local_rank={local_rank} under the launcher")


@pytest.mark.distributed
def test_dead_rank_ends_the_job(tmp_path):
    """kill -9 of one rank mid-training: the survivor's gloo collective fails at once (connection reset),
    the launcher kills the rest and exits non-zero, well within 120 s."""
    out = tmp_path / "run"
    args = [a for a in run_args(out) if not a.startswith("--optim.steps")] + ["--optim.steps=100000"]
    cmd = deepspeed_cmd("--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *args)
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(out, 2, lambda: launcher.poll())
        victim = rank_pid(launcher, 1)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = launcher.wait(timeout=180)
        elapsed = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    print(f"dead rank: launcher exited {code} after {elapsed:.1f} s")
    assert code != 0
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end after a rank died"


# -------------------------------------------------------------------------------------------- Slurm


def slurm():
    for tool in ("sbatch", "scontrol", "scancel", "squeue"):
        if shutil.which(tool) is None:
            unavailable(
                f"no {tool}: Slurm is not installed (scripts/cluster/slurm-up.sh installs and starts it)"
            )
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in r.stdout:
        unavailable('no Slurm controller answers (eval "$(scripts/cluster/slurm-up.sh)" starts one)')


SAVED = r"checkpoint saved: \S*global_step(\d+)"  # the trainer's line for each checkpoint
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def job_info(job: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def wait_job(job: str, until, what: str, timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(0.3)
    raise AssertionError(f"job {job}: {what} did not happen in {timeout} s: {info}")


@pytest.mark.slurm
def test_slurm_job_preempted_twice_resumes_exactly(tmp_path, reference):
    """train.sbatch with 2 tasks on one node: the time-limit warning (USR1 to the batch shell, as
    --signal=B:USR1@120 sends it) makes the tasks checkpoint and the job requeue itself; `scontrol requeue`
    (TERM to every task) does the same through Slurm. Each restart resumes from the checkpoint, the job
    ends COMPLETED, and its loss curve is the uninterrupted run's."""
    slurm()
    out, joblog = tmp_path / "run", tmp_path / "job.out"
    cmd = [
        "sbatch", "--parsable", "--job-name=seco-test", "--nodes=1", "--ntasks-per-node=2",
        "--gpus-per-node=0", f"--output={joblog}", f"--export=ALL,SECO_PYTHON={sys.executable}",
        str(SBATCH), *run_args(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    t0 = time.monotonic()

    def log() -> str:
        return joblog.read_text() if joblog.exists() else ""

    def ended() -> str | None:
        state = job_info(job).get("JobState")
        return None if state in LIVE_STATES else f"{state}: {log()[-3000:]}"

    try:
        # 1. The time-limit warning, sent to the batch shell only (what B:USR1@120 does).
        wait_for_step(out, 1, ended)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        wait_job(job, lambda i: i.get("Restarts") == "1", "a self-requeue after USR1")
        wait_job(job, lambda i: i.get("JobState") == "RUNNING", "the restart")
        first = re.search(SAVED, log())
        assert first and "preempted by SIGUSR1" in log(), log()[-3000:]
        k1 = int(first.group(1))
        assert 1 <= k1 < STEPS, f"the run ended before the signal took effect (step {k1})"

        # 2. An administrator's / the scheduler's requeue: TERM to every process of the job.
        wait_for_step(out, k1 + 1, ended)
        subprocess.run(["scontrol", "requeue", job], check=True)
        wait_job(job, lambda i: i.get("Restarts") == "2", "the requeue")
        info = wait_job(job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the end")
    finally:
        if job_info(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
            subprocess.run(["scancel", job])
    text = log()
    print(f"slurm job {job}: {time.monotonic() - t0:.0f} s from submission to the end of 3 runs")
    assert info["JobState"] == "COMPLETED", text[-4000:]
    saved = [int(s) for s in re.findall(SAVED, text)]  # two preemptions, then the end
    resumed = [int(s) for s in re.findall(r"resumed from \S*global_step(\d+)", text)]
    assert "preempted by SIGTERM" in text, text[-4000:]
    assert len(saved) == 3 and saved[-1] == STEPS and resumed == saved[:2], text[-4000:]
    assert text.count("seco: job ") == 3 and "restart 2" in text
    assert f"done: steps {saved[1] + 1}..{STEPS}" in text
    assert (out / "ckpt" / "latest").read_text().strip() == f"global_step{STEPS}"
    assert {f"global_step{s}" for s in (*saved, STEPS)} <= {p.name for p in (out / "ckpt").iterdir()}
    assert_same_curve(losses(out), reference)


# ------------------------------------------------------------------------- scripts and the image


def test_sbatch_script_parses_and_wants_a_config():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    for script in (REPO / "scripts" / "cluster").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    r = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "usage" in r.stderr
    text = SBATCH.read_text()
    for directive in ("--signal=B:USR1@", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}" in text


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_pins_the_tested_versions():
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    steps = dockerfile_instructions()
    keywords = [k.upper() for k, _ in steps]
    assert keywords[0] in ("FROM", "ARG"), "a Dockerfile starts with FROM (or the ARGs it uses)"
    assert "FROM" in keywords
    # PID 1 of the container is the signal-forwarding supervisor, so `docker stop` (TERM to PID 1) reaches
    # every rank, which saves and exits 0 (docs/faults-and-safety.md).
    entry = [v for k, v in steps if k.upper() == "ENTRYPOINT"]
    assert entry and "launch/preemptible.py" in entry[-1], "the image's entry point must forward signals"
    users = [v for k, v in steps if k.upper() == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    for extra in ("mpi",):
        wanted.update({Requirement(r).name: Requirement(r) for r in project["optional-dependencies"][extra]})
    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt must pin exactly: {line}"
            pins[req.name] = spec.version
    assert set(wanted) <= set(pins), f"not pinned: {sorted(set(wanted) - set(pins))}"
    for name, req in wanted.items():
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy pyproject's {req}"
    run = " ".join(v for k, v in steps if k.upper() == "RUN")
    assert "constraints.txt" in run and "[mpi]" in run, "the project is installed with the pins and MPI"
