"""A step whose batch holds no loss token on any rank (every label -100): zero gradient, loss 0 (not NaN),
the step applied and the run going on, said once and counted; a resumed run gets past it the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAULTY = REPO / "tests" / "workers" / "faulty_train.py"
FAST = [
    "--data.seq_len=128",
    "--chunking.chunk_size=64",
    "--optim.warmup_steps=0",
    "--optim.schedule=constant",
]
FAST += ["--logging.progress_bar=false", "--logging.tensorboard=false", "--deepspeed.zero_stage=2"]


def train(root: Path, *overrides: str, no_loss: str = "") -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        str(FAULTY),
        f"--no-loss-steps={no_loss}",
        "--config",
        str(REPO / "configs" / "tiny-cpu.yaml"),
    ]
    args += [*FAST, f"--logging.dir={root}/log", f"--checkpoint.dir={root}/ckpt", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def records(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "log" / "metrics.jsonl").read_text().splitlines()]


def test_step_without_loss_tokens_proceeds_and_resumes(tmp_path):
    whole = train(tmp_path / "whole", "--optim.steps=4", "--checkpoint.every=2", no_loss="3")
    rec = records(tmp_path / "whole")
    assert [r["loss_tokens"] == 0 for r in rec] == [False, False, True, False]
    assert rec[2]["loss"] == 0.0 and not rec[2]["skipped"]  # applied, with the zero gradient
    assert rec[2]["grad_norm"] == 0.0
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in rec[:2] + rec[3:])  # no NaN anywhere
    assert whole.stdout.count("no rank's batch holds a loss token") == 1
    assert "1 batch(es) of this run held no loss token (zero gradient), the first at step 3" in whole.stdout
    # Stopped at step 2, resumed: the resumed run meets the same batch at step 3 and gets past it exactly.
    train(tmp_path / "split", "--optim.steps=2", "--checkpoint.every=2", no_loss="3")
    train(
        tmp_path / "split", "--optim.steps=4", "--checkpoint.every=2", "--checkpoint.resume=auto", no_loss="3"
    )
    resumed = records(tmp_path / "split")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in rec], rel=1e-6)


class _Engine:
    """What optimizer_step reads of a DeepSpeed engine that applied its step."""

    def __init__(self, norm):
        self.norm = norm

    def zero_optimization_stage(self):
        return 2

    def bfloat16_enabled(self):
        return False

    fp16_enabled = bfloat16_enabled

    def step(self):
        pass

    def was_step_applied(self):
        return True

    def get_global_grad_norm(self):
        return self.norm


def test_the_guard_names_the_cause():
    from engine.distributed import optimizer_step

    assert optimizer_step(_Engine(0.5), 1.25, 10)
    with pytest.raises(
        RuntimeError, match=r"loss was nan \(10 loss tokens\): the gradient was finite \(norm 0.5\)"
    ):
        optimizer_step(_Engine(0.5), float("nan"), 10)
    with pytest.raises(
        RuntimeError,
        match="computed no gradient norm to check; do not turn off zero_optimization.compute_grad_norm",
    ):
        optimizer_step(_Engine(None), float("inf"), 10)
