"""Leaving the process group releases DeepSpeed's cached groups: a second engine in the same process (a test
session, a notebook, a sweep in one interpreter) must not reuse groups of the destroyed one."""

import torch
from tiny import tiny_model

from engine import distributed


def test_a_second_engine_after_shutdown_initializes():
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    for _ in range(2):  # torch's teardown alone fails the second round: "Group ... is not registered"
        distributed.init_distributed()
        engine = distributed.initialize(tiny_model(dtype=torch.float32), ds_config)
        assert engine.module is not None
        distributed.shutdown()
