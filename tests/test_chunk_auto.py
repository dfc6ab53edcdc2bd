"""chunking.chunk_size: auto: the trainer takes the planner's choice for the memory it has, and says so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from one_rank import outputs, train_cmd

from engine.chunk_auto import resolve_chunk_size
from engine.config import ConfigError
from engine.config_load import load_config
from engine.plan import ModelShape, choose_chunk_size
from engine.plan.cli import setup_from_config
from engine.plan.setup import usable_memory

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def test_auto_is_the_planners_largest_fitting_chunk():
    cfg = load_config(None, ["--chunking.chunk_size=auto", "--data.seq_len=32768"])
    chosen = []
    for extra in (60 * MiB, 200 * MiB, 2048 * MiB):
        total = 2**30 + extra  # usable_memory keeps back 1 GiB and 10% of the rest
        resolved, line = resolve_chunk_size(cfg, 1, memory=(total, "cpu", "a test budget"))
        size = resolved.chunking.chunk_size
        setup = {**setup_from_config(cfg, "cpu", 1), "chunk_size": 1}
        shape = ModelShape.from_config(dict(cfg.model.hf_config))
        assert size == choose_chunk_size(shape, seq_len=32768, device_memory=usable_memory(total), **setup)
        assert line.startswith(f"chunking.chunk_size: auto -> {size} ") and "a test budget" in line
        chosen.append(size)
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1]  # more memory, longer chunks
    with pytest.raises(ValueError, match="auto: no chunk size fits data.seq_len 32768 in a test budget"):
        resolve_chunk_size(cfg, 1, memory=(2**30 + 5 * MiB, "cpu", "a test budget"))
    fixed = load_config(None, [])
    assert resolve_chunk_size(fixed, 1) == (fixed, "")


def test_auto_with_a_budget_is_refused():
    with pytest.raises(ConfigError, match="chunking.budget: counts chunks of a chunk size"):
        load_config(None, ["--chunking.chunk_size=auto", "--chunking.mode=spaco", "--chunking.sampler=fixed",
                           "--chunking.budget=2"])  # fmt: skip


def test_trainer_runs_with_auto_and_prints_the_choice(tmp_path):
    args = train_cmd(
        "--chunking.chunk_size=auto", "--data.seq_len=256", "--optim.steps=1", "--optim.warmup_steps=0"
    )
    args += [*outputs(tmp_path), "--logging.progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "chunking.chunk_size: auto -> 256 (" in r.stdout and "chunks 1/1" in r.stdout
    assert "data: rows: 2000 of 256 tokens" in r.stdout  # the start-up data summary
