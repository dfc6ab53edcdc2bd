"""Leaving the process group releases DeepSpeed's cached groups: a second engine in the same process (a test
session, a notebook, a sweep in one interpreter) must not reuse groups of the destroyed one. And a run of one
process leaves the process environment as it found it: a rank variable left behind would make a later
in-process HF Trainer join a process group and wrap its model in DDP."""

import os

import pytest
import torch
import torch.distributed as dist
from tiny import tiny_model
from transformers import TrainingArguments
from transformers.training_args import ParallelMode

from engine import distributed

RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


@pytest.fixture
def no_launcher(monkeypatch):
    """The environment of `python launch/train.py`: no launcher announced a rank."""
    for key in RANK_ENV:
        monkeypatch.delenv(key, raising=False)


def test_a_second_engine_after_shutdown_initializes(no_launcher):
    for _ in range(2):  # torch's teardown alone fails the second round: "Group ... is not registered"
        distributed.init_distributed()
        engine = distributed.initialize(tiny_model(dtype=torch.float32), DS_CONFIG)
        assert engine.module is not None
        distributed.shutdown()


def test_a_world_of_one_leaves_the_environment_unchanged(no_launcher, tmp_path):
    before = dict(os.environ)
    distributed.init_distributed()
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # passed to torch, not announced
    engine = distributed.initialize(tiny_model(dtype=torch.float32), DS_CONFIG)
    assert engine.local_rank == 0  # DeepSpeed's engine reads LOCAL_RANK from the environment only
    distributed.shutdown()
    assert dict(os.environ) == before
    # What the environment is for: transformers then sees one process, not a launcher's rank.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.local_rank == -1 and args.parallel_mode == ParallelMode.NOT_PARALLEL


def test_a_launchers_environment_is_kept(monkeypatch):
    """Under a launcher the rank variables are the launcher's: used, and left as they were."""
    from one_rank import rank_zero_of_one

    for key, value in rank_zero_of_one().items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    distributed.init_distributed(distributed.join_rendezvous())
    assert dist.get_world_size() == 1 and dict(os.environ) == before
    distributed.shutdown()
    assert dict(os.environ) == before
