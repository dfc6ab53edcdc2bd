"""launch/train.py end to end on CPU ranks: learning, exact resume, preemption, a crash mid-save, exports.

Two-rank runs are started either by the real `deepspeed` launcher or, cheaper, as two processes with
RANK / WORLD_SIZE / MASTER_* set, which is what srun / torchrun do. Losses are read back from the JSONL
metrics file the trainer writes to logging.dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from one_rank import free_port, outputs

from engine.schedule import spaco_generator
from engine.trainer import lr_at

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
CONFIG = REPO / "configs" / "tiny-cpu.yaml"
# The exact-resume / preemption / crash runs: SpaCO (so the per-step draw must survive a resume too), a
# constant LR (so a run stopped by optim.steps continues as if it had never stopped), ZeRO-2.
SHORT = [
    "--data.seq_len=256",
    "--chunking.chunk_size=64",
    "--chunking.mode=spaco",
    "--chunking.sample_prob=0.5",
    "--optim.steps=8",
    "--optim.warmup_steps=0",
    "--optim.schedule=constant",
    "--logging.progress_bar=false",
    "--logging.tensorboard=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_ranks(
    root: Path, *overrides: str, nprocs: int = 2, env: dict | None = None, faults: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """Processes of one run with the rendezvous in the environment, as srun or torchrun start them;
    `faults` go to tests/workers/faulty_train.py (e.g. "--crash-in-save=6"), which then replaces TRAIN."""
    script = [str(REPO / "tests" / "workers" / "faulty_train.py"), *faults] if faults else [str(TRAIN)]
    port, procs = str(free_port()), []
    root.mkdir(parents=True, exist_ok=True)
    for rank in range(nprocs):
        rank_env = {**ENV, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank)}
        rank_env.update(WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        args = [sys.executable, *script, "--config", str(CONFIG), *outputs(root), *overrides]
        log = open(root / f"rank{rank}.log", "a")
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=rank_env, cwd=root))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def logs(root: Path) -> str:
    return "\n".join(
        (root / f"rank{r}.log").read_text()[-3000:] for r in range(2) if (root / f"rank{r}.log").exists()
    )


def run_ranks(
    root: Path, *overrides: str, env: dict | None = None, expect: int = 0, faults: tuple[str, ...] = ()
) -> None:
    codes = wait(start_ranks(root, *overrides, env=env, faults=faults))
    assert codes == [expect, expect], logs(root)


def run_deepspeed(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN)]
    cmd += ["--config", str(CONFIG), *outputs(root), *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def metrics(root: Path) -> list[dict]:
    lines = (root / "log" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(root: Path) -> list[float]:
    rec = metrics(root)
    assert [m["step"] for m in rec] == list(range(1, len(rec) + 1)), "one record per step, in order"
    return [m["loss"] for m in rec]


def latest(root: Path) -> str:
    return (root / "ckpt" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """8 uninterrupted steps, 2 ranks, ZeRO-2, full-model HF export at the end."""
    root = tmp_path_factory.mktemp("reference")
    run_ranks(root, *SHORT, "--checkpoint.every=4", "--checkpoint.export=hf")
    return root


# ------------------------------------------------------------------------------------------ cheap units


def test_lr_schedule():
    from engine.config import OptimConfig

    cos = OptimConfig(steps=10, lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    got = [lr_at(s, cos) for s in range(1, 11)]
    assert got[:3] == [0.5, 1.0, 1.0]  # warmup, then the decay starts at the peak
    assert got[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(got[1:], got[2:], strict=False))
    lin = OptimConfig(steps=5, lr=2.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_at(s, lin) for s in range(1, 6)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    const = OptimConfig(steps=5, lr=2.0, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const) for s in range(1, 6)} == {2.0}


def test_spaco_draw_depends_on_seed_and_step_only():
    draw = [torch.rand(16, generator=spaco_generator(42, s)) for s in (1, 2)]
    assert torch.equal(draw[0], torch.rand(16, generator=spaco_generator(42, 1)))
    assert not torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], torch.rand(16, generator=spaco_generator(43, 1)))


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.distributed
def test_deepspeed_launcher_run_learns(tmp_path):
    """(a) The shipped tiny config under the real launcher: the loss falls clearly in 30 steps."""
    r = run_deepspeed(tmp_path, "--data.seq_len=512", "--chunking.chunk_size=64", "--optim.steps=30",
                      "--logging.progress_bar=false")  # fmt: skip
    curve = losses(tmp_path)
    assert len(curve) == 30
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.8, curve  # ~5.5 (uniform over 259 bytes) -> ~4
    assert "step 30/30" in r.stdout and "done: steps 1..30" in r.stdout
    assert list((tmp_path / "log" / "tensorboard").glob("run-*/events.out.tfevents.*")), (
        "TensorBoard event file"
    )
    assert latest(tmp_path) == "global_step30"
    ckpt = tmp_path / "ckpt" / "global_step30"
    assert (ckpt / "mp_rank_00_model_states.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert {m["num_chunks"] for m in metrics(tmp_path)} == {8}


@pytest.mark.distributed
def test_exact_resume(tmp_path, reference):
    """(b) 4 steps, then a second run resuming from the checkpoint for 4 more = 8 steps in one run."""
    run_ranks(tmp_path, *SHORT, "--optim.steps=4")
    assert latest(tmp_path) == "global_step4"
    run_ranks(tmp_path, *SHORT, "--checkpoint.resume=auto")
    assert "resumed from" in (tmp_path / "rank0.log").read_text()
    assert losses(tmp_path) == losses(reference)  # bit for bit: weights, Adam state, data, SpaCO draw
    assert latest(tmp_path) == "global_step8"


@pytest.mark.distributed
def test_preemption_saves_and_resumes(tmp_path, reference):
    """(e) SIGTERM to one rank mid-run: all ranks finish the step, save, exit 0; the requeued run continues
    and the combined loss curve equals the uninterrupted one."""
    procs = start_ranks(tmp_path, *SHORT, "--checkpoint.resume=auto")
    log = tmp_path / "log" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), logs(tmp_path)
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)  # only rank 1: rank 0 learns of it through the per-step agreement
    assert wait(procs) == [0, 0], logs(tmp_path)
    stopped = len(metrics(tmp_path))
    assert 2 <= stopped < 8, f"preempted after step {stopped}; the run should have been cut short"
    assert "preempted by" in (tmp_path / "rank0.log").read_text()
    assert latest(tmp_path) == f"global_step{stopped}"
    assert not (tmp_path / "ckpt" / "export").exists()

    run_ranks(tmp_path, *SHORT, "--checkpoint.resume=auto")  # the requeued job: same command line
    assert losses(tmp_path) == losses(reference)


@pytest.mark.distributed
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, reference):
    """(f) A crash inside the save of step 6 (after the temporary directory is written) leaves `latest` on
    step 3, which loads and resumes exactly."""
    common = [*SHORT, "--optim.steps=6", "--checkpoint.every=3", "--checkpoint.resume=auto"]
    run_ranks(tmp_path, *common, faults=("--crash-in-save=6",), expect=1)
    assert "simulated crash" in logs(tmp_path)
    ckpt = tmp_path / "ckpt"
    assert latest(tmp_path) == "global_step3"
    assert (ckpt / "tmp.global_step6").is_dir() and not (ckpt / "global_step6").exists()

    run_ranks(tmp_path, *common)
    assert "resumed from" in (tmp_path / "rank0.log").read_text().split("simulated crash")[-1]
    assert losses(tmp_path) == losses(reference)[:6]
    assert latest(tmp_path) == "global_step6" and not (ckpt / "tmp.global_step6").exists()


# --------------------------------------------------------------------------------------------- exports


def consolidated(root: Path, lora: bool) -> torch.nn.Module:
    """The trained model rebuilt from the final DeepSpeed checkpoint through zero_to_fp32, independently
    of the trainer's export code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from engine.config_load import load_config
    from engine.model import apply_lora, build_model

    cfg = load_config(str(CONFIG), [f"--lora.enabled={str(lora).lower()}"])
    model = apply_lora(build_model(cfg.model, seed=0), cfg.lora)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root / "ckpt"), tag=latest(root))
    model.load_state_dict(state, strict=True)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def initial_model() -> torch.nn.Module:
    from engine.config_load import load_config
    from engine.model import build_model

    cfg = load_config(str(CONFIG), [])
    return build_model(cfg.model, seed=cfg.optim.seed).eval()


@pytest.mark.distributed
def test_full_export_zero2(reference):
    """(c) The HF export of a full fine-tune loads with from_pretrained and is the trained model."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(reference / "ckpt" / "export").eval()
    got = logits(exported)
    torch.testing.assert_close(got, logits(consolidated(reference, lora=False)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(initial_model()), atol=1e-3)


@pytest.mark.distributed
def test_lora_merged_export_zero3(tmp_path):
    """(c) ZeRO-3 + LoRA, export hf: weights consolidated from the ZeRO-3 shards, adapters merged in."""
    from transformers import AutoModelForCausalLM

    run_ranks(tmp_path, *SHORT[:2], "--optim.steps=3", "--optim.warmup_steps=0", "--deepspeed.zero_stage=3",
              "--lora.enabled=true", "--checkpoint.export=hf", "--logging.progress_bar=false")  # fmt: skip
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "export").eval()
    trained = consolidated(tmp_path, lora=True)
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)  # B starts at 0
    torch.testing.assert_close(logits(exported), logits(trained), rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in exported.state_dict())


def test_plain_python_lora_adapter_export(tmp_path):
    """(d) `python launch/train.py` alone (a world of one, ZeRO-2) and (c) the LoRA adapter export, which
    PeftModel.from_pretrained loads onto the base model."""
    from peft import PeftModel

    args = [sys.executable, str(TRAIN), "--config", str(CONFIG), *outputs(tmp_path), *SHORT[:2]]
    args += [
        "--optim.steps=3",
        "--optim.warmup_steps=0",
        "--lora.enabled=true",
        "--checkpoint.export=lora",
        "--logging.progress_bar=false",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: steps 1..3" in r.stdout
    export = tmp_path / "ckpt" / "export"
    assert (export / "adapter_config.json").is_file()
    base = initial_model()
    base_logits = logits(base)
    adapted = PeftModel.from_pretrained(base, export).eval()
    got = logits(adapted)
    torch.testing.assert_close(got, logits(consolidated(tmp_path, lora=True)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-4)


def test_checkpoint_resolution(tmp_path):
    """resume: auto ignores temporary directories and falls back when `latest` is gone."""
    from engine.checkpoint import find_resume
    from engine.config import CheckpointConfig

    ckpt = tmp_path / "ckpt"
    for name in ("global_step2", "global_step10", "tmp.global_step12"):
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / "mp_rank_00_model_states.pt").write_bytes(b"")
    cfg = CheckpointConfig(dir=str(ckpt), resume="auto")
    assert find_resume(cfg) == (str(ckpt), "global_step10")
    (ckpt / "latest").write_text("global_step2")
    assert find_resume(cfg) == (str(ckpt), "global_step2")
    assert find_resume(CheckpointConfig(dir=str(ckpt), resume=str(ckpt / "global_step10"))) == (
        str(ckpt),
        "global_step10",
    )
    assert find_resume(CheckpointConfig(dir=str(tmp_path / "none"), resume="auto")) is None
    shutil.rmtree(ckpt / "global_step2")
    assert find_resume(cfg) == (str(ckpt), "global_step10")  # `latest` names a directory that is gone


@pytest.mark.distributed
def test_sequence_parallel_run_equals_one_rank(tmp_path):
    """parallel.sequence 2 under the deepspeed launcher (both ranks read the same rows, each chunk split over
    them) has the losses of the same run on one rank with parallel.sequence 1; resuming it is bit-exact. The
    evaluation after the last step (held-out loss, a retrieval cell), scored by the group with each chunk
    split too, equals the one rank's."""
    run = ["--data.seq_len=256", "--chunking.chunk_size=64", "--optim.steps=3", "--optim.warmup_steps=0",
           "--optim.schedule=constant", "--logging.progress_bar=false", "--logging.tensorboard=false",
           "--eval.split=0.25", "--eval.retrieval.lengths=[96]", "--eval.retrieval.depths=[0.5]",
           "--eval.retrieval.items=3", "--eval.retrieval.key_digits=2"]  # fmt: skip
    assert wait(start_ranks(tmp_path / "one", *run, nprocs=1)) == [0], logs(tmp_path / "one")
    run_deepspeed(tmp_path / "sp", *run, "--parallel.sequence=2", "--checkpoint.every=2")
    one, sp = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert len(sp) == 3 and sp == pytest.approx(one, rel=1e-5, abs=0)
    # the chunks really were split: rank 0 held the K/V of half of the heads
    assert {m["kv_bytes"] * 2 for m in metrics(tmp_path / "sp")} == {
        m["kv_bytes"] for m in metrics(tmp_path / "one")
    }
    resumed = tmp_path / "resumed"
    run_ranks(resumed, *run, "--parallel.sequence=2", f"--checkpoint.resume={tmp_path}/sp/ckpt/global_step2")
    assert [m["loss"] for m in metrics(resumed)] == sp[2:]  # bit for bit: weights, Adam state, data
    one_eval, sp_eval = metrics(tmp_path / "one")[-1], metrics(tmp_path / "sp")[-1]
    assert sp_eval["eval/tokens"] == one_eval["eval/tokens"] > 0
    assert sp_eval["eval/loss"] == pytest.approx(one_eval["eval/loss"], rel=1e-5, abs=0)
    assert [c["items"] for c in sp_eval["eval/retrieval"]] == [3]
    assert sp_eval["eval/retrieval"] == one_eval["eval/retrieval"]
    assert metrics(resumed)[-1]["eval/loss"] == sp_eval["eval/loss"]
