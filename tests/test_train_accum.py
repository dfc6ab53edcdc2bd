"""Gradient accumulation through launch/train.py: N=2 micro-batches of 1 row train exactly as N=1 batch of 2
rows (float64 model, rows of uneven lengths), optim.epochs sets the steps, the start-up summary and the
throughput fields; a 2-rank SpaCO run with N=2 resumes bit for bit between optimizer steps."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from one_rank import outputs
from test_train_e2e import CONFIG, ENV, SHORT, TRAIN, latest, losses, metrics, run_ranks

# A jsonl of 16 documents of 20 to 250 bytes, one per row (no packing): rows of uneven lengths, so the
# micro-batches of a step hold different numbers of loss tokens.
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def documents(path: Path) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(16):
            f.write(
                json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))}) + "\n"
            )
    return path


def train_alone(root: Path, *overrides: str) -> str:
    root.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(TRAIN), "--config", str(CONFIG), *outputs(root), *overrides]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=root, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def weights(root: Path) -> dict[str, torch.Tensor]:
    tag = latest(root)
    return torch.load(root / "ckpt" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


def test_two_micro_batches_of_one_row_equal_one_batch_of_two(tmp_path):
    data = documents(tmp_path / "docs.jsonl")
    common = [
        "--data.kind=jsonl", f"--data.path={data}", "--data.packing=false", "--data.seq_len=128",
        "--chunking.chunk_size=32", "--model.dtype=float64", "--optim.steps=null", "--optim.epochs=0.5",
        "--optim.warmup_steps=1", "--logging.progress_bar=false", "--logging.tensorboard=false",
    ]  # fmt: skip
    accum, batch = tmp_path / "accum", tmp_path / "batch"
    out = train_alone(accum, *common, "--data.batch_size=1", "--optim.grad_accum_steps=2")
    train_alone(batch, *common, "--data.batch_size=2", "--logging.peak_tflops=0.001")
    assert "effective batch: 2 rows = data.batch_size 1 x 2 micro-batches x 1 data-parallel ranks" in out
    # what no row holds whole is said at start: the documents longer than seq_len, split over several rows
    split = re.search(
        r"data: documents: 16, (\d+) tokens, one per row; (\d+) longer than seq_len 128: split", out
    )
    assert split and int(split.group(2)) > 0, out[:2000]
    assert re.search(
        rf"train set: \d+ rows of up to 128 tokens, {int(split.group(1)) / 1000:.2f}K non-padding", out
    )
    # R rows (long documents split into several): R micro-batches of 1 an epoch, 2 per step -> R / 2 steps an
    # epoch, ceil(R / 4) in half an epoch
    rows = int(re.search(r"train set: (\d+) rows", out).group(1))
    steps = -(-rows // 4)
    assert (
        f"steps: {steps} optimizer steps, {rows / 2:g} per epoch" in out and f"done: steps 1..{steps}" in out
    )
    a, b = metrics(accum), metrics(batch)
    assert len(a) == len(b) == steps
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]
    assert len({r["loss_tokens"] for r in a}) > 1  # the steps' token counts differ: normalisation matters
    # grad_clip (1.0) acted on some steps: it clips the step's whole gradient, not each micro-batch's
    assert max(r["grad_norm"] for r in a) > 1.0
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-9)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-12, abs=0)
    wa, wb = weights(accum), weights(batch)
    assert wa.keys() == wb.keys() and wa["lm_head.weight"].dtype == torch.float64
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-12, atol=1e-14)
    # throughput: non-padding tokens per second, never more than the padded figure; MFU only with a peak
    for r in a + b:
        assert 0 < r["tokens_per_s"] <= r["tokens_per_s_padded"] and r["eta_s"] >= 0
    assert all(r["mfu"] is None for r in a) and all(r["mfu"] > 0 for r in b)
    assert any(r["tokens_per_s"] < r["tokens_per_s_padded"] for r in b)  # two rows padded to the longer


@pytest.mark.distributed
def test_exact_resume_with_accumulation(tmp_path):
    """2 ranks, SpaCO, 2 micro-batches per step: 2 steps, then a resumed run for 2 more equals 4 steps in one
    run bit for bit (weights, Adam state, data position, every micro-batch's draw)."""
    accum = [*SHORT, "--optim.grad_accum_steps=2", "--data.seq_len=128", "--chunking.chunk_size=32"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_ranks(whole, *accum, "--optim.steps=4")
    run_ranks(parts, *accum, "--optim.steps=2")
    assert latest(parts) == "global_step2"
    run_ranks(parts, *accum, "--optim.steps=4", "--checkpoint.resume=auto")
    assert "resumed from" in (parts / "rank0.log").read_text()
    assert losses(parts) == losses(whole) and len(losses(whole)) == 4
    assert {r["num_chunks"] for r in metrics(whole)} == {8}  # 2 micro-batches x 4 chunks
