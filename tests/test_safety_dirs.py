"""One writer per run and nothing outside it: the run lock, links planted in checkpoint.dir / logging.dir,
hostile `latest` files, named pipes where files are expected, a pickle payload in pytorch_model.bin, a full
disk under logging.dir. All on temporary directories; one live one-rank engine (module fixture) for saves."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from one_rank import hold_lock, launcher, trained_run
from test_safety import Payload

from engine import checkpoint, run_lock
from engine.config import CheckpointConfig
from engine.safe_paths import UnsafePath

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
FAST = ["--data.seq_len=128", "--chunking.chunk_size=64", "--data.num_samples=8", "--optim.warmup_steps=0"]
FAST += ["--logging.progress_bar=false", "--logging.tensorboard=false"]


def launcher_main(root: Path, capsys, *overrides: str) -> tuple[int, str]:
    """launch/train.py's main() in this process: (exit code, its last stderr line)."""
    out = [f"--logging.dir={root}/log", f"--checkpoint.dir={root}/ckpt", "--optim.steps=1"]
    code = launcher().main(["--config", str(CONFIG), *FAST, *out, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


# ------------------------------------------------------------------------------------------------ the lock


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/ckpt's lock."""
    p = hold_lock(tmp_path / "ckpt")
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def test_second_run_is_refused_naming_the_holder(tmp_path, holder, capsys):
    t0 = time.time()
    code, err = launcher_main(tmp_path, capsys)
    assert code == 2 and err.startswith("error: checkpoint.dir: ")
    assert f"in use by another run (pid {holder.pid} on host {socket.gethostname()}" in err
    assert time.time() - t0 < 60 and not (tmp_path / "log").exists()  # refused first: nothing else written


def test_a_run_sharing_only_the_logging_dir_is_refused(tmp_path, capsys):
    """Two runs with their own checkpoint.dir but one logging.dir would interleave their metrics: the second
    is refused naming logging.dir and the holder."""
    p = hold_lock(tmp_path / "log")
    try:
        code, err = launcher_main(tmp_path, capsys)
    finally:
        p.kill()
        p.wait()
    assert code == 2 and err.startswith("error: logging.dir: ") and f"(pid {p.pid} on host" in err, err
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


def test_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path, holder, capsys):
    holder.send_signal(signal.SIGKILL)  # no clean-up at all: the kernel drops the flock
    holder.wait()
    lock = run_lock.acquire(tmp_path / "ckpt", "checkpoint.dir")
    try:
        err = capsys.readouterr().err
        assert f"taking over {str(tmp_path / 'ckpt' / 'run.lock')!r}" in err and f"pid {holder.pid}" in err
        assert (tmp_path / "ckpt" / "run.lock").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    finally:
        lock.release()
    assert (tmp_path / "ckpt" / "run.lock").read_text() == ""  # released cleanly: nothing to take over


def test_lock_file_that_is_a_link_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("keep")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "run.lock").symlink_to(outside)
    with pytest.raises(UnsafePath, match="run.lock' is a symbolic link"):
        run_lock.acquire(tmp_path / "ckpt", "checkpoint.dir")
    assert outside.read_text() == "keep"


# --------------------------------------------------------------------------- a live engine for the saves


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirs")
    overrides = [*FAST, "--optim.steps=1", f"--logging.dir={root}/log", f"--checkpoint.dir={root}/ckpt"]
    with trained_run(CONFIG, overrides, root) as run:
        yield run


def save(run, ckpt: Path, step: int) -> str:
    state = {"step": step, "data": run.stream.state_dict(), "config": {}, "world_size": 1}
    return checkpoint.save(run.engine, str(ckpt), step, state)


def test_save_removes_only_its_own_temporaries(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    mine = ckpt / "tmp.Xq3aB9kLm2"  # what `mktemp -d -p ckpt` makes
    mine.mkdir(parents=True)
    (mine / "notes").write_text("keep")
    (ckpt / "tmp.global_step7").mkdir()  # this engine's leftover of an interrupted save
    save(run, ckpt, 2)
    assert (mine / "notes").read_text() == "keep"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step2", "latest", "tmp.Xq3aB9kLm2", "zero_to_fp32.py", "zero_to_torch.py"]  # fmt: skip


@pytest.mark.parametrize("name", ["tmp.latest", "zero_to_fp32.py", "zero_to_torch.py", "tmp.global_step2", "global_step2", "latest"])  # fmt: skip
def test_planted_link_is_refused_by_name_and_nothing_outside_changes(run, tmp_path, name):
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    ckpt.mkdir()
    outside.mkdir()
    (outside / "f").write_text("keep")
    target = outside if name.startswith(("tmp.global", "global")) else outside / "f"
    (ckpt / name).symlink_to(target)
    with pytest.raises(UnsafePath, match=f"{name}' is a symbolic link"):
        checkpoint.check_dir(str(ckpt))  # at start-up: exit 2 naming it
    with pytest.raises(checkpoint.SaveFailed, match=f"{name}' is a symbolic link"):
        save(run, ckpt, 2)  # and at every save (a link planted during the run)
    assert sorted(p.name for p in outside.iterdir()) == ["f"] and (outside / "f").read_text() == "keep"
    assert os.stat(outside / "f").st_mode & 0o111 == 0  # not made executable either


def test_planted_link_at_tmp_export_is_refused(run, tmp_path):
    from engine.export import export

    ckpt, outside = tmp_path / "ckpt", tmp_path / "model"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    save(run, ckpt, 2)
    (ckpt / "tmp.export").symlink_to(outside)
    with pytest.raises(UnsafePath, match="tmp.export' is a symbolic link"):
        export(run.engine, CheckpointConfig(dir=str(ckpt), export="hf"), "global_step2", None)
    assert [p.name for p in outside.iterdir()] == ["config.json"]
    (ckpt / "tmp.export").unlink()
    assert export(run.engine, CheckpointConfig(dir=str(ckpt), export="hf"), "global_step2", None)  # control


def test_link_in_logging_dir_is_refused_at_start(tmp_path, capsys):
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    code, err = launcher_main(tmp_path, capsys)
    assert code == 2 and "metrics.jsonl' is a symbolic link" in err
    assert not (tmp_path / "elsewhere.jsonl").exists()


# ----------------------------------------------------------------------------------------- `latest`


def with_latest(run, tmp_path: Path, content: bytes | None = None) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run.root / "ckpt", ckpt, ignore=shutil.ignore_patterns("run.lock"))
    if content is not None:
        (ckpt / "latest").write_bytes(content)
    return ckpt


@pytest.mark.parametrize(
    "tag", ["../../elsewhere/global_step1", "/abs/ckpt/global_step1", "global_step1/../.."]
)
def test_latest_naming_outside_is_refused(run, tmp_path, tag):
    ckpt = with_latest(run, tmp_path, tag.encode())
    for resume in ("auto", str(ckpt)):
        with pytest.raises(UnsafePath, match=r"latest' names .*not a checkpoint of this directory"):
            checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume=resume))


def test_latest_control_resumes(run, tmp_path):
    ckpt = with_latest(run, tmp_path)
    assert checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume="auto")) == (
        str(ckpt),
        "global_step1",
    )


def test_non_utf8_latest_is_named(run, tmp_path):
    ckpt = with_latest(run, tmp_path, b"global_step\xff")
    with pytest.raises(UnsafePath, match=r"latest' is not UTF-8"):
        checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume="auto"))


def test_huge_or_linked_latest_is_not_read_whole(run, tmp_path):
    ckpt = with_latest(run, tmp_path)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse 1 GiB: reading it whole would take seconds and a GiB
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to(big)
    with pytest.raises(UnsafePath, match="latest' is a symbolic link"):
        checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume="auto"))
    (ckpt / "latest").unlink()
    os.rename(big, ckpt / "latest")
    t0 = time.time()
    with pytest.raises(UnsafePath, match="latest' is larger than 256 bytes"):
        checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume="auto"))
    assert time.time() - t0 < 1


def test_linked_tag_directory_is_refused(run, tmp_path):
    ckpt = with_latest(run, tmp_path)
    os.rename(ckpt / "global_step1", tmp_path / "foreign")
    (ckpt / "global_step1").symlink_to(tmp_path / "foreign")
    with pytest.raises(UnsafePath, match="global_step1' is a symbolic link"):
        checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume="auto"))


# ------------------------------------------------------------------------ named pipes, pickled weights


def must_not_block(fn, fifo: Path) -> BaseException | None:
    """Run fn in a thread; if it blocks on opening the pipe, unblock it (open the writing end) and fail."""
    result: list = []

    def target():
        try:
            fn()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))
        t.join(10)
        pytest.fail(f"blocked on the named pipe {fifo}")
    return result[0]


def test_named_pipe_in_checkpoint_does_not_block(run, tmp_path):
    ckpt = with_latest(run, tmp_path)
    fifo = ckpt / "global_step1" / "rng_rank0.pt"
    fifo.unlink()
    os.mkfifo(fifo)
    e = must_not_block(lambda: checkpoint.verify(str(ckpt), "global_step1", 1), fifo)
    assert isinstance(e, ValueError) and "rng_rank0.pt" in str(e) and "not a regular file" in str(e)
    (ckpt / "latest").unlink()
    os.mkfifo(ckpt / "latest")
    e = must_not_block(
        lambda: checkpoint.find_resume(CheckpointConfig(dir=str(ckpt), resume="auto")), ckpt / "latest"
    )
    assert isinstance(e, UnsafePath) and "latest' is not a regular file" in str(e)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_named_pipe_in_tokenizer_dir_does_not_block(tmp_path, name):
    from engine.file_checks import check_json_files

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    os.mkfifo(tok / name)
    e = must_not_block(lambda: check_json_files(tok, "data.tokenizer: file"), tok / name)
    assert isinstance(e, ValueError) and f"{name}' is not a regular file" in str(e)


def test_pickle_payload_in_pytorch_model_bin_is_one_error_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=259)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m", safe_serialization=False)
    bin_file = tmp_path / "m" / "pytorch_model.bin"
    torch.save({"x": Payload(tmp_path / "ran")}, bin_file)
    code, err = launcher_main(
        tmp_path, capsys, f"--model.name_or_path={tmp_path}/m", "--model.hf_config=null"
    )
    assert code == 2 and err.startswith("error: model.name_or_path: file ")
    assert str(bin_file) in err and "refused" in err and "GLOBAL exec" in err
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------------- full logging.dir disk


def test_metrics_write_failure_warns_once_and_goes_on(tmp_path, capsys):
    from engine.config import LoggingConfig
    from engine.metrics import Metrics

    m = Metrics(LoggingConfig(dir=str(tmp_path), tensorboard=False, progress_bar=False), 3, 0, enabled=True)
    calls = []

    def full(line: str) -> None:
        calls.append(line)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    m.write_line = full
    record = {"total_steps": 3, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "step_time_s": 1.0}
    record |= {"num_chunks": 1, "chunks_backpropagated": 1, "peak_memory_bytes": 0}
    for step in (1, 2, 3):
        m.log(step, record)
    m.close()
    out = capsys.readouterr().out
    assert out.count("warning: writing metrics under logging.dir") == 1 and "No space left" in out
    assert len(calls) == 1 and out.count("step 3/3") == 1  # the log line still printed


def test_full_logging_disk_keeps_the_checkpoints(tmp_path):
    cmd = [sys.executable, str(REPO / "tests" / "workers" / "faulty_train.py"), "--enospc-in-log=2"]
    cmd += ["--config", str(CONFIG), *FAST, "--optim.steps=3", "--checkpoint.every=1"]
    cmd += [f"--logging.dir={tmp_path}/log", f"--checkpoint.dir={tmp_path}/ckpt"]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("warning: writing metrics under logging.dir") == 1
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step3"
    assert len((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()) == 1  # step 1's record only
