"""launch/train.py on bad input: exit code 2, `error: <message naming the key or file>`, nothing written.
And the non-finite loss path: a NaN step is skipped (no update) and logged; N in a row abort the run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from one_rank import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
FAULTY = REPO / "tests" / "workers" / "faulty_train.py"
FAST = [
    "--data.seq_len=128",
    "--chunking.chunk_size=64",
    "--optim.steps=3",
    "--optim.warmup_steps=0",
    "--logging.progress_bar=false",
]


def args_for(tmp_path: Path, *overrides: str) -> list[str]:
    out = tmp_path / "out"  # every output goes under here
    args = ["--config", str(REPO / "configs" / "tiny-cpu.yaml"), *FAST]
    return args + [f"--logging.dir={out}/log", f"--checkpoint.dir={out}/ckpt", *overrides]


def train(
    tmp_path: Path, *overrides: str, env: dict | None = None, faults: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """One process, no launcher; `faults` go to tests/workers/faulty_train.py (e.g. "--nan-steps=1")."""
    script = [str(FAULTY), *faults] if faults else [str(TRAIN)]
    args = [sys.executable, *script, *args_for(tmp_path, *overrides)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=full_env)


def _load_launcher():
    spec = importlib.util.spec_from_file_location("seco_launch_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAUNCHER = _load_launcher()


def train_inprocess(tmp_path: Path, capsys, *overrides: str) -> subprocess.CompletedProcess:
    """launch/train.py's main() in this process: every user error is raised before a process group or
    an output directory exists, so the expensive imports are paid once for the whole file."""
    code = LAUNCHER.main(args_for(tmp_path, *overrides))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


def assert_user_error(r: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    assert not (tmp_path / "out").exists(), "a failed start must not create output directories"


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> Path:
    """An HF tokenizer without bos/eos (so a one-word document is one token) whose word 'big' has id
    300, outside the tiny model's 259-entry vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "big": 300}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("word_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return path


def jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_misspelled_key(tmp_path):
    r = train(tmp_path, "--optim.lrr=1e-3")  # a real process: the exit status itself is 2
    assert_user_error(r, tmp_path, "optim.lrr", "optim.lr")  # names the key and suggests the right one


def test_unknown_section(tmp_path, capsys):
    r = train_inprocess(tmp_path, capsys, "--optimizer.lr=1e-3")
    assert_user_error(r, tmp_path, "optimizer")


def test_wrong_type(tmp_path, capsys):
    r = train_inprocess(tmp_path, capsys, "--optim.steps=many")
    assert_user_error(r, tmp_path, "optim.steps", "int")


def test_missing_data_file(tmp_path, capsys):
    r = train_inprocess(tmp_path, capsys, "--data.kind=jsonl", f"--data.path={tmp_path}/nope.jsonl")
    assert_user_error(r, tmp_path, "data.path", "nope.jsonl")


def test_ds_config_batch_size_contradiction(tmp_path, capsys):
    r = train_inprocess(tmp_path, capsys, "--deepspeed.config={train_micro_batch_size_per_gpu: 4}")
    assert_user_error(r, tmp_path, "train_micro_batch_size_per_gpu", "data.batch_size")


def test_ds_config_global_batch_contradicts_world_size(tmp_path, capsys):
    # A multiple of data.batch_size, so only the world size (1 here) shows the contradiction.
    r = train_inprocess(tmp_path, capsys, "--deepspeed.config={train_batch_size: 4}")
    assert_user_error(r, tmp_path, "train_batch_size", "world size 1")


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    r = train_inprocess(tmp_path, capsys, "--data.kind=jsonl", f"--data.path={tmp_path}/empty.jsonl")
    assert_user_error(r, tmp_path, "empty.jsonl", "empty")


def unpacked_documents(tmp_path, capsys, docs: list[str], *args: str):
    """train_inprocess on d.jsonl holding `docs`, one document per row (no packing)."""
    path = jsonl(tmp_path / "d.jsonl", docs)
    return train_inprocess(
        tmp_path, capsys, "--data.kind=jsonl", f"--data.path={path}", "--data.packing=false", *args
    )


def test_blank_document(tmp_path, capsys):
    r = unpacked_documents(tmp_path, capsys, ["a real document", "   "])
    assert_user_error(r, tmp_path, "d.jsonl", "line 2", "empty")


def test_document_shorter_than_two_tokens(tmp_path, capsys, word_tokenizer):
    r = unpacked_documents(tmp_path, capsys, ["a b a b", "a"], f"--data.tokenizer={word_tokenizer}")
    assert_user_error(r, tmp_path, "d.jsonl", "line 2", "fewer than 2")


def test_token_ids_outside_vocab_byte_tokenizer(tmp_path, capsys):
    r = train_inprocess(tmp_path, capsys, "--model.hf_config.vocab_size=200", "--model.hf_config.pad_token_id=0",
              "--model.hf_config.bos_token_id=1", "--model.hf_config.eos_token_id=2")  # fmt: skip
    assert_user_error(r, tmp_path, "vocab_size", "200", "byte")


def test_token_ids_outside_vocab_hf_tokenizer(tmp_path, capsys, word_tokenizer):
    r = unpacked_documents(tmp_path, capsys, ["a b a b", "a big b"], f"--data.tokenizer={word_tokenizer}")
    assert_user_error(r, tmp_path, "token id 300", "vocab_size=259", "document 1")


def test_resume_dir_without_checkpoint(tmp_path, capsys):
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    r = train_inprocess(tmp_path, capsys, f"--checkpoint.resume={empty}")
    assert_user_error(r, tmp_path, "checkpoint.resume", "not_a_checkpoint", "no checkpoint")


def test_resume_path_missing(tmp_path, capsys):
    r = train_inprocess(tmp_path, capsys, f"--checkpoint.resume={tmp_path}/gone")
    assert_user_error(r, tmp_path, "checkpoint.resume", "gone")


@pytest.mark.distributed
def test_user_error_through_deepspeed_launcher(tmp_path):
    """Both ranks fail the same check before joining a process group; the launcher passes the 2 on."""
    (tmp_path / "empty.jsonl").write_text("")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN)]
    cmd += args_for(tmp_path, "--data.kind=jsonl", f"--data.path={tmp_path}/empty.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "error: jsonl data file" in errors[0]  # once, not once per rank
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ non-finite losses


def metrics(tmp_path: Path) -> list[dict]:
    return [
        json.loads(line) for line in (tmp_path / "out" / "log" / "metrics.jsonl").read_text().splitlines()
    ]


def init_loss_on_batch(step: int, *overrides: str, micro_batches: int = 1) -> float:
    """Loss of the untrained model on what a one-process run trains on at `step`: its `micro_batches`
    batches, token-weighted (HF's loss over all of them)."""
    from engine.config_load import load_config
    from engine.data import DataStream, build_dataset, load_tokenizer
    from engine.model import build_model

    cfg = load_config(str(REPO / "configs" / "tiny-cpu.yaml"), [*FAST, *overrides])
    stream = DataStream(build_dataset(cfg.data, load_tokenizer("byte")), 1, 0, 1, seed=cfg.data.seed)
    batches = [next(stream) for _ in range(step * micro_batches)][-micro_batches:]
    model = build_model(cfg.model, seed=cfg.optim.seed)
    total = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, tokens = total + model(**batch).loss.item() * n, tokens + n
    return total / tokens


@pytest.mark.parametrize("stage", [0, 2])  # stage 0: dropped by the engine; 1-3: DeepSpeed's overflow skip
def test_nonfinite_step_is_skipped_and_logged(tmp_path, stage):
    r = train(tmp_path, f"--deepspeed.zero_stage={stage}", faults=("--nan-steps=1",))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "step 1: non-finite loss or gradients" in r.stdout and "update skipped" in r.stdout
    rec = metrics(tmp_path)
    assert [m["skipped"] for m in rec] == [True, False, False]
    # No update at step 1 and no NaN left in the optimizer: step 2 sees the initial weights, step 3 trains.
    assert rec[1]["loss"] == pytest.approx(init_loss_on_batch(2), rel=1e-5)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in rec[1:])
    assert rec[0]["grad_norm"] is None
    if stage > 0:  # DeepSpeed reports no norm for the plain fp32 stage-0 optimizer
        assert rec[2]["grad_norm"] is not None and rec[2]["grad_norm"] > 0


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_step_with_accumulation_skips_the_whole_step(tmp_path, stage):
    """2 micro-batches per step, both poisoned at step 1: one optimizer step skipped (none of its micro-batches'
    gradients applied or left behind), and step 2 trains on micro-batches 3 and 4 from the initial weights."""
    accum = (f"--deepspeed.zero_stage={stage}", "--optim.grad_accum_steps=2")
    r = train(tmp_path, *accum, faults=("--nan-steps=1",))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rec = metrics(tmp_path)
    assert [m["skipped"] for m in rec] == [True, False, False] and [m["step"] for m in rec] == [1, 2, 3]
    assert rec[1]["loss"] == pytest.approx(init_loss_on_batch(2, micro_batches=2), rel=1e-5)
    assert rec[1]["loss"] != pytest.approx(init_loss_on_batch(2), rel=1e-5)  # not one micro-batch's
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in rec[1:])
    assert rec[2]["loss"] != pytest.approx(init_loss_on_batch(3, micro_batches=2), rel=1e-5)  # step 2 applied


def test_nonfinite_steps_in_a_row_abort(tmp_path):
    r = train(
        tmp_path,
        "--optim.steps=5",
        "--optim.max_nonfinite_steps=2",
        "--checkpoint.every=1",
        faults=("--nan-steps=2,3",),
    )
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 steps in a row") and "optim.max_nonfinite_steps=2" in last
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    # Checkpoints written before the abort stay (a skipped step leaves the weights valid); the aborting step writes none.
    assert (tmp_path / "out" / "ckpt" / "latest").read_text() == "global_step2"
