"""Checkpoints never run code, and late faults are messages.

One real checkpoint (one step, one rank, ZeRO-2, in this process) is written once; every test tampers with a
copy of it: a pickle payload in each file (it must not run, and the error names the file), truncated files, a
model that differs on resume, a different world size, a missing RNG file, a full disk during a save.
"""

from __future__ import annotations

import builtins
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from one_rank import trained_run

from engine import checkpoint
from engine.safe_load import CheckpointError, deepspeed_loads_safely, load_file

REPO = Path(__file__).resolve().parents[1]
FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt")
TAG = "global_step1"


class Payload:
    """Unpickled with code allowed, it writes `marker`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def write_payload(path: Path, marker: Path) -> None:
    torch.save({"state": Payload(marker)}, path)


def overrides(root: Path, *extra: str) -> list[str]:
    return [
        "--data.seq_len=128",
        "--chunking.chunk_size=64",
        "--data.num_samples=8",
        "--optim.steps=1",
        "--optim.warmup_steps=0",
        "--logging.progress_bar=false",
        "--logging.tensorboard=false",
        f"--logging.dir={root}/log",
        f"--checkpoint.dir={root}/ckpt",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A live one-rank engine whose step-1 checkpoint is in root/ckpt (the process group stays up for the
    module: tests load into this engine)."""
    root = tmp_path_factory.mktemp("safety")
    with trained_run(REPO / "configs" / "tiny-cpu.yaml", overrides(root), root) as run:
        yield run


@pytest.fixture
def ckpt(run, tmp_path) -> Path:
    """A fresh copy of the checkpoint directory to tamper with."""
    dst = tmp_path / "ckpt"
    shutil.copytree(run.root / "ckpt", dst)
    return dst


# ------------------------------------------------------------------------------------ nothing executes


def test_payload_is_live_without_weights_only(tmp_path):
    """The control: the payload does run when unpickled the way DeepSpeed's own loader does."""
    marker = tmp_path / "ran"
    write_payload(tmp_path / "f.pt", marker)
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("name", FILES)
def test_payload_in_any_checkpoint_file_is_refused_before_the_run(ckpt, tmp_path, name):
    marker = tmp_path / "ran"
    write_payload(ckpt / TAG / name, marker)
    with pytest.raises(CheckpointError, match="refused") as e:
        checkpoint.verify(str(ckpt), TAG, world_size=1)
    assert name in str(e.value) and "Unsupported global: GLOBAL exec" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", FILES[:2])
def test_deepspeeds_own_loader_is_routed_through_the_safe_load(run, ckpt, tmp_path, name):
    """engine.load_checkpoint itself (not only our pre-check) refuses: DeepSpeed unpickles model states and
    ZeRO shards with weights_only=False unless its checkpoint engine is swapped."""
    marker = tmp_path / "ran"
    write_payload(ckpt / TAG / name, marker)
    with pytest.raises(CheckpointError, match="refused") as e, deepspeed_loads_safely(run.engine):
        run.engine.load_checkpoint(str(ckpt), tag=TAG)
    assert name in str(e.value) and not marker.exists()
    assert type(run.engine.checkpoint_engine).__name__ == "TorchCheckpointEngine"  # restored afterwards


def test_payload_in_rng_file_does_not_run_on_load(run, ckpt, tmp_path):
    marker = tmp_path / "ran"
    write_payload(ckpt / TAG / "rng_rank0.pt", marker)
    with pytest.raises(CheckpointError, match="rng_rank0.pt"):
        checkpoint.load(run.engine, str(ckpt), TAG)
    assert not marker.exists()


def test_intact_checkpoint_loads_with_deepspeed_types_allowed(run, ckpt):
    """The allow-list is enough for DeepSpeed's ZeRO states (loss scaler, stage enum, fragment map)."""
    checkpoint.verify(str(ckpt), TAG, world_size=1)
    state = checkpoint.load(run.engine, str(ckpt), TAG)
    assert state["step"] == 1
    with pytest.raises(Exception, match="Unsupported global"):  # ... and needed: torch's default refuses
        torch.load(ckpt / TAG / FILES[1], weights_only=True)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    checkpoint.set_rng_state(checkpoint.rng_state())  # the same state back: nothing else changes
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no allow-list at all
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


# --------------------------------------------------------------------------------- late faults: messages


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_checkpoint_file_is_named(ckpt, name, keep):
    path = ckpt / TAG / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        checkpoint.verify(str(ckpt), TAG, world_size=1)
    assert name in str(e.value)


def test_other_world_size_is_refused_clearly(ckpt):
    with pytest.raises(CheckpointError, match="written by 1 data-parallel ranks and this run has 2"):
        checkpoint.verify(str(ckpt), TAG, world_size=2)


def test_missing_rng_file_warns_loudly(run, ckpt, capsys):
    (ckpt / TAG / "rng_rank0.pt").unlink()
    checkpoint.verify(str(ckpt), TAG, world_size=1)
    checkpoint.load(run.engine, str(ckpt), TAG)
    err = capsys.readouterr().err
    assert (
        "WARNING: rank 0" in err and "rng_rank0.pt' is missing" in err and "NOT continue bit for bit" in err
    )


def test_changed_model_on_resume_names_the_parameters(run):
    """Same checkpoint.dir, wider MLP: a user error naming the differing parameters and their shapes."""
    from engine import trainer
    from engine.config_load import load_config

    cfg = load_config(
        str(REPO / "configs" / "tiny-cpu.yaml"),
        overrides(run.root, "--model.hf_config.intermediate_size=96", "--checkpoint.resume=auto"),
    )
    with pytest.raises(CheckpointError) as e:  # a ValueError: launch/train.py exits 2
        trainer.setup(cfg)  # the process group is up already: setup joins it
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight: [128, 64] in the checkpoint, [96, 64] now" in msg
    assert "6 parameters" in msg  # gate/up/down of both layers


def test_full_disk_during_save_leaves_no_temporary_directory(run, ckpt):
    def full_disk(obj, path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    state = {"step": 2, "data": run.stream.state_dict(), "config": {}, "world_size": 1}
    with pytest.raises(checkpoint.SaveFailed, match="No space left on device") as e:
        checkpoint.save(run.engine, str(ckpt), 2, state, write=full_disk)
    assert "previous checkpoint" in str(e.value) and "global_step2" in str(e.value)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [TAG]  # no tmp.global_step2 left
    assert (ckpt / "latest").read_text() == TAG
    checkpoint.verify(str(ckpt), TAG, world_size=1)  # the previous checkpoint is untouched


def test_load_file_names_a_non_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="x.pt' is truncated or corrupt"):
        load_file(tmp_path / "x.pt")


def test_legacy_format_is_loaded_weights_only_too(tmp_path):
    """ds_config checkpoint_serialization: false writes torch's legacy (non-zip) format: same rules."""
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(tmp_path / "ok.pt", mmap=True)["a"], torch.ones(2))
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, tmp_path / "bad.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="bad.pt' refused"):
        load_file(tmp_path / "bad.pt")
    assert not marker.exists()
