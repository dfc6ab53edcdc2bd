"""checkpoint.resume_weights_only: a 2-rank checkpoint starts a 1-rank run on new data from its weights (the
optimizer fresh), a same-size one with its optimizer states too; step 0, a fresh stream; a requeued job then
resumes its own checkpoint exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from one_rank import free_port

from engine.config import CheckpointConfig, ConfigError
from engine.safe_load import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
FAST = ["--data.seq_len=128", "--chunking.chunk_size=64", "--optim.warmup_steps=0", "--data.num_samples=32"]
FAST += ["--logging.progress_bar=false", "--logging.tensorboard=false"]


def train(root: Path, *args: str, ranks: int = 1) -> str:
    """A run of `ranks` processes (rendezvous in the environment); returns rank 0's output."""
    port, procs = str(free_port()), []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, str(TRAIN), "--config", str(CONFIG), *FAST]
        cmd += [f"--logging.dir={root}/log", f"--checkpoint.dir={root}/ckpt", *args]
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * ranks, "\n".join(o[-3000:] for o in outs)
    return outs[0]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "mp_rank_00_model_states.pt")["module"]


def adam_steps(ckpt: Path) -> int:
    """The optimizer's own step count in a ZeRO checkpoint: what a fresh optimizer restarts from 0."""
    (optim,) = ckpt.glob("zero_pp_rank_0_*optim_states.pt")
    state = torch.load(optim, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    return int(state[0]["step"])


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.distributed
def test_weights_only_across_world_sizes_then_exact_requeue(tmp_path):
    a = tmp_path / "a"
    train(a, "--optim.steps=3", ranks=2)
    source = weights(a / "ckpt" / "global_step3")
    # lr 1e-12: the one step moves no weight measurably, so B's saved weights are the ones it started from.
    b_args = ["--optim.steps=1", "--optim.lr=1e-12", "--data.seed=5", f"--checkpoint.resume={a}/ckpt"]
    out = train(tmp_path / "b", *b_args, "--checkpoint.resume_weights_only=true")
    assert "started from the weights (another world size: fresh optimizer)" in out and "step 1/1" in out
    assert max_diff(weights(tmp_path / "b" / "ckpt" / "global_step1"), source) < 1e-8
    assert (
        adam_steps(a / "ckpt" / "global_step3") == 3
        and adam_steps(tmp_path / "b" / "ckpt" / "global_step1") == 1
    )
    train(tmp_path / "fresh", "--optim.steps=1", "--optim.lr=1e-12")  # negative control: no resume
    assert max_diff(weights(tmp_path / "fresh" / "ckpt" / "global_step1"), source) > 1e-3
    # Same world size: the optimizer states come along.
    out = train(
        tmp_path / "c",
        *b_args[:3],
        f"--checkpoint.resume={tmp_path}/b/ckpt",
        "--checkpoint.resume_weights_only=true",
    )
    assert "started from the weights and optimizer states of" in out
    assert adam_steps(tmp_path / "c" / "ckpt" / "global_step1") == 2  # b's Adam state, one step further
    # The same command again (a requeued job): checkpoint.dir's own checkpoint wins and resumes exactly.
    out = train(
        tmp_path / "b", *b_args[:2], "--optim.steps=2", *b_args[2:], "--checkpoint.resume_weights_only=true"
    )
    assert f"resumed from {tmp_path}/b/ckpt/global_step1 at step 1" in out and "step 2/2" in out


def test_weights_only_needs_a_checkpoint_path_outside_the_dir(tmp_path):
    with pytest.raises(ConfigError, match="needs checkpoint.resume set to a checkpoint path"):
        CheckpointConfig(dir=str(tmp_path), resume="auto", resume_weights_only=True)
    with pytest.raises(ConfigError, match="is inside checkpoint.dir"):
        CheckpointConfig(dir=str(tmp_path), resume=str(tmp_path / "global_step3"), resume_weights_only=True)
    CheckpointConfig(dir=str(tmp_path / "new"), resume=str(tmp_path / "old"), resume_weights_only=True)
