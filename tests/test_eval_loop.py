"""Evaluation in the training loop (engine/evaluate.py): eval/loss is HF's loss over the held-out set, on 1
and 2 ranks; checkpoint retention; the held-out split is never trained on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from one_rank import free_port, outputs
from test_train_e2e import CONFIG, ENV, REPO, TRAIN

from engine.config_load import load_config
from engine.data import ByteTokenizer, SyntheticDataset, collate
from engine.evaluate import main as evaluate_main
from engine.evaluate import shard_batches, split_rows

# 2 steps in float64, the eval set held out of 44 synthetic rows (11 of them, uneven over 2 ranks with
# batch 2), retrieval on a tiny grid; the HF export at the end is the evaluated model.
RUN = [
    "--model.dtype=float64",
    "--data.seq_len=256",
    "--data.num_samples=44",
    "--chunking.chunk_size=64",
    "--optim.steps=2",
    "--optim.warmup_steps=0",
    "--eval.split=0.25",
    "--eval.batch_size=2",
    "--eval.retrieval.lengths=[96,160]",
    "--eval.retrieval.depths=[0.0,1.0]",
    "--eval.retrieval.items=3",
    "--eval.retrieval.key_digits=2",
    "--checkpoint.export=hf",
    "--logging.progress_bar=false",
]


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "log" / "metrics.jsonl").read_text().splitlines()]


def hf_eval_loss(model_dir: Path) -> tuple[float, int]:
    """HF's loss over the held-out rows in one process, float64: summed CE over all targets / their count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    cfg = load_config(str(CONFIG), RUN)
    data = SyntheticDataset("kv_recall", 256, 44, cfg.data.seed, ByteTokenizer())
    _, held = split_rows(44, 0.25, cfg.data.seed)
    batch = collate([data[i] for i in held])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = torch.full_like(batch["labels"], -100)
    targets[:, :-1] = batch["labels"][:, 1:]
    n = int((targets != -100).sum())
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item(), n


def check_run(root: Path, every_step: bool = False) -> None:
    recs = records(root)
    assert [r["step"] for r in recs] == [1, 2]
    assert ("eval/loss" in recs[0]) == every_step  # eval.every unset: after the last step only
    last = recs[-1]
    ref, n = hf_eval_loss(root / "ckpt" / "export")
    assert last["eval/tokens"] == n == 11 * 4
    assert last["eval/loss"] == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert last["eval/ppl"] == pytest.approx(math.exp(ref), rel=1e-12)
    cells = last["eval/retrieval"]
    assert [(c["length"], c["depth"]) for c in cells] == [(96, 0.0), (96, 1.0), (160, 0.0), (160, 1.0)]
    assert all(c["items"] == 3 and 0.0 <= c["accuracy"] <= 1.0 for c in cells)
    assert (root / "log" / "retrieval.png").is_file() and (root / "log" / "metrics.png").is_file()


def test_eval_loss_is_hf_loss_one_process(tmp_path):
    """Also: eval and a checkpoint at every step, keep_last 1 + keep_best: the newest and the best stay."""
    keep = [
        "--eval.every=1",
        "--checkpoint.every=1",
        "--checkpoint.keep_last=1",
        "--checkpoint.keep_best=true",
    ]
    args = [sys.executable, str(TRAIN), "--config", str(CONFIG), *outputs(tmp_path), *RUN, *keep]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "eval step 2 | loss" in r.stdout
    check_run(tmp_path, every_step=True)
    first, last = (r["eval/loss"] for r in records(tmp_path))
    scores = json.loads((tmp_path / "ckpt" / "eval_losses.json").read_text())
    assert scores["global_step2"] == last
    kept = {p.name for p in (tmp_path / "ckpt").glob("global_step*")}
    assert kept == ({"global_step1", "global_step2"} if first < last else {"global_step2"})

    # The same evaluation as a command, of the checkpoint and of the export: the logged numbers again.
    logged = records(tmp_path)[-1]
    for source in (["--checkpoint", str(tmp_path / "ckpt")], ["--model", str(tmp_path / "ckpt" / "export")]):
        out = tmp_path / f"cli{source[0]}"
        assert evaluate_main(["--config", str(CONFIG), *source, "--out", str(out), *RUN]) == 0
        got = json.loads((out / "evaluation.json").read_text())
        assert got["eval/loss"] == pytest.approx(logged["eval/loss"], rel=1e-12)
        assert got["eval/retrieval"] == logged["eval/retrieval"]
        assert (out / "retrieval.png").is_file()
    wrong = ["--config", str(CONFIG), "--checkpoint", str(tmp_path / "ckpt"), *RUN, "--lora.enabled=true"]
    assert (
        evaluate_main(wrong) == 2
    )  # the checkpoint's weights do not fit a LoRA model: said, not a traceback


@pytest.mark.distributed
def test_eval_loss_is_hf_loss_two_ranks(tmp_path):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN)]
    cmd += ["--config", str(CONFIG), *outputs(tmp_path), *RUN]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check_run(tmp_path)
    # Retrieval counts summed over the ranks' shards: what one process scores on the export.
    out = tmp_path / "cli"
    assert (
        evaluate_main(
            ["--config", str(CONFIG), "--model", str(tmp_path / "ckpt" / "export"), "--out", str(out), *RUN]
        )
        == 0
    )
    assert (
        json.loads((out / "evaluation.json").read_text())["eval/retrieval"]
        == records(tmp_path)[-1]["eval/retrieval"]
    )


@pytest.mark.distributed
def test_eval_under_zero3_two_ranks(tmp_path):
    """ZeRO-3: every chunk's forward gathers parameters, so both ranks must run as many of them (uneven
    shards, retrieval cells). The export passes through zero_to_fp32, which writes float32: the reference
    is the float64 run's weights rounded to float32, hence the tolerance."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN)]
    cmd += ["--config", str(CONFIG), *outputs(tmp_path), *RUN, "--deepspeed.zero_stage=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    last = records(tmp_path)[-1]
    ref, n = hf_eval_loss(tmp_path / "ckpt" / "export")
    assert last["eval/tokens"] == n
    assert last["eval/loss"] == pytest.approx(ref, rel=1e-6)
    assert len(last["eval/retrieval"]) == 4
    # python -m engine.evaluate on the ZeRO-3 checkpoint: its shards consolidated (float32 too).
    out = tmp_path / "cli"
    assert (
        evaluate_main(
            [
                "--config",
                str(CONFIG),
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--out",
                str(out),
                *RUN,
                "--deepspeed.zero_stage=3",
            ]
        )
        == 0
    )
    assert json.loads((out / "evaluation.json").read_text())["eval/loss"] == pytest.approx(ref, rel=1e-12)


# ------------------------------------------------------------------------------------------------- units


def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_rows(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert (train, held) == split_rows(100, 0.1, seed=3)
    assert held != split_rows(100, 0.1, seed=4)[1]
    assert split_rows(5, 0.01, 0)[1] != []  # at least one row
    with pytest.raises(ValueError, match="leaving none to train on"):
        split_rows(2, 0.9, 0)


def test_shards_have_as_many_batches_on_every_rank():
    rows = list(range(11))
    shards = [list(shard_batches(rows, r, 2, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    assert sorted(i for s in shards for b in s for i in b) == rows
    three = [list(shard_batches([7], r, 3, 4)) for r in range(3)]
    assert three == [[[7]], [[]], [[]]]  # ranks without rows still run one (target-less) batch


def test_eval_config_rules():
    def error(*overrides):
        with pytest.raises(ValueError) as e:
            load_config(str(CONFIG), list(overrides))
        return str(e.value)

    assert "at most one of eval.path and eval.split" in error("--eval.split=0.1", "--eval.path=x")
    assert "eval.split: must be in (0, 1)" in error("--eval.split=1.0")
    assert "eval.every: nothing to evaluate" in error("--eval.every=5")
    assert "eval.path: data.kind 'synthetic'" in error(f"--eval.path={CONFIG}")
    assert "eval.seq_len: only with eval.path" in error("--eval.split=0.1", "--eval.seq_len=64")
    assert "eval.retrieval.depths: each must be in [0, 1]" in error("--eval.retrieval.depths=[1.5]")
    assert "unknown key 'eval.retrival'" in error("--eval.retrival.lengths=[64]")
    assert "checkpoint.keep_best: needs checkpoint.keep_last" in error("--checkpoint.keep_best=true")
    assert "needs an eval loss" in error("--checkpoint.keep_last=2", "--checkpoint.keep_best=true")
    assert "must be a multiple of eval.every" in error(
        "--checkpoint.keep_last=2", "--checkpoint.keep_best=true", "--eval.split=0.1", "--eval.every=3"
    )
    ok = load_config(str(CONFIG), ["--eval.split=0.1", "--eval.every=10", "--checkpoint.keep_last=1",
                                   "--checkpoint.keep_best=true"])  # fmt: skip
    assert ok.eval.has_loss and ok.checkpoint.keep_best


# --------------------------------------------------------------------------------------------- retention


def fake_checkpoints(root: Path, steps: list[int], latest: int) -> None:
    for step in steps:
        (root / f"global_step{step}").mkdir(parents=True)
        (root / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (root / "latest").write_text(f"global_step{latest}")


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    from engine.retention import prune, record_score, to_delete

    tags = [f"global_step{s}" for s in (10, 20, 30, 40)]
    assert to_delete(tags, 2, False, {}) == ["global_step10", "global_step20"]
    scores = {"global_step20": 1.5, "global_step30": 2.0, "global_step40": 1.9, "global_step10": math.nan}
    assert to_delete(tags, 1, True, scores) == ["global_step10", "global_step30"]
    assert to_delete(tags, 1, True, {}) == tags[:3]  # nothing scored: keep_last alone

    fake_checkpoints(tmp_path, [10, 20, 30], latest=30)
    (tmp_path / "tmp.global_step40").mkdir()  # a save in progress
    (tmp_path / "global_step5").mkdir()  # incomplete (no model states): not a checkpoint, left alone
    record_score(tmp_path, "global_step10", 0.5)
    record_score(tmp_path, "global_step20", 0.9)
    assert prune(tmp_path, 1, True, saved="global_step30") == ["global_step20"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "eval_losses.json",
        "global_step10",
        "global_step30",
        "global_step5",
        "latest",
        "tmp.global_step40",
    ]
    assert json.loads((tmp_path / "eval_losses.json").read_text()) == {"global_step10": 0.5}
    assert prune(tmp_path, None, False, saved="global_step30") == []  # keep_last null: keep all


def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path):
    """A run resumed from an older checkpoint saves a step below others already there."""
    from engine.retention import prune

    fake_checkpoints(tmp_path, [10, 20, 30], latest=30)
    (tmp_path / "global_step15").mkdir()
    (tmp_path / "global_step15" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert prune(tmp_path, 1, False, saved="global_step15") == ["global_step10", "global_step20"]
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step15", "global_step30"]


def test_eval_path_loss_is_hf_loss_token_weighted(tmp_path):
    """eval.path (jsonl, one document per padded row, documents of very different lengths): the loss is
    the summed CE over every target of every row / their number, not a mean of batch means."""
    from engine.data import load_tokenizer
    from engine.evaluate import eval_loss, prepare_eval
    from engine.model import build_model

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[: 1 + (i * 7) % 10] * (1 + i % 3)) for i in range(7)]
    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = load_config(
        str(CONFIG),
        [f"--data.path={tmp_path}/train.jsonl", f"--eval.path={tmp_path}/eval.jsonl", "--data.kind=jsonl",
         "--data.packing=false", "--data.seq_len=64", "--eval.seq_len=48", "--model.dtype=float64",
         "--chunking.chunk_size=16", "--eval.batch_size=3", f"--logging.dir={tmp_path}/log"],
    )  # fmt: skip
    tokenizer = load_tokenizer("byte")
    _, evaluator = prepare_eval(cfg, tokenizer, None, 259)
    rows = evaluator.eval_set
    n = len(rows)  # documents longer than a row continue in the next one
    assert n >= 7 and rows[0]["input_ids"].numel() == 48
    model = build_model(cfg.model, seed=0).eval()
    got = eval_loss(model, rows, list(range(n)), 3, evaluator.chunk_size, evaluator.options)
    batch = collate([rows[i] for i in range(n)])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = torch.full_like(batch["labels"], -100)
    targets[:, :-1] = batch["labels"][:, 1:]
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item()
    assert got["eval/tokens"] == int((targets != -100).sum())
    assert got["eval/loss"] == pytest.approx(ref, rel=1e-12)
    # Negative control: the mean of the three batches' means is another number.
    means = []
    for b in [list(range(i, min(i + 3, n))) for i in range(0, n, 3)]:
        t = targets[b]
        means.append(F.cross_entropy(logits[b].flatten(0, 1), t.flatten(), ignore_index=-100).item())
    assert abs(sum(means) / len(means) - ref) > 1e-3


def test_eval_points_reach_tensorboard_jsonl_and_the_plots(tmp_path):
    from tiny import event_accumulator

    EventAccumulator = event_accumulator()

    from engine import report
    from engine.config import LoggingConfig
    from engine.metrics import Metrics

    metrics = Metrics(LoggingConfig(dir=str(tmp_path), every=5, progress_bar=False), 2, 0, enabled=True)
    base = dict(total_steps=2, lr=1e-3, grad_norm=1.0, tokens_per_s=1.0, step_time_s=1.0, peak_memory_bytes=1,
                num_chunks=1, chunks_backpropagated=1, compensation=1.0, aux_loss=None, skipped=False)  # fmt: skip
    cells = [{"length": 64, "depth": d, "accuracy": a, "items": 2} for d, a in ((0.0, 1.0), (0.5, 0.5))]
    metrics.log(1, {**base, "loss": 3.0})
    metrics.log(2, {**base, "loss": 2.0, "eval/loss": 2.5, "eval/ppl": math.exp(2.5), "eval/retrieval": cells,
                    "eval/retrieval_acc": 0.75})  # fmt: skip
    metrics.close()
    (run_dir,) = (tmp_path / "tensorboard").iterdir()  # logging.dir/tensorboard/run-<start>/
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "eval/loss",
        "eval/ppl",
        "eval/retrieval_acc",
        "eval/retrieval/L64_d0",
        "eval/retrieval/L64_d0.5",
    } <= tags
    assert [e.value for e in events.Scalars("eval/loss")] == [2.5]  # logged although 2 % logging.every != 0
    assert report.last_retrieval(report.read_records(tmp_path)) == (2, cells)
    assert (tmp_path / report.PLOT_FILE).is_file() and (tmp_path / report.RETRIEVAL_FILE).is_file()


def test_split_rows_are_held_out_of_the_stream_and_max_samples_caps_them():
    from engine.data import DataStream
    from engine.evaluate import prepare_eval

    cfg = load_config(str(CONFIG), ["--data.seq_len=128", "--data.num_samples=40", "--eval.split=0.25",
                                    "--eval.max_samples=4"])  # fmt: skip
    data = SyntheticDataset("kv_recall", 128, 40, cfg.data.seed, ByteTokenizer())
    train, evaluator = prepare_eval(cfg, ByteTokenizer(), data, 259)
    held = set(evaluator.eval_set.indices)
    assert len(held) == 10 and len(train) == 30 and held.isdisjoint(train.indices)
    assert evaluator.rows == [0, 1, 2, 3]  # the first 4 held-out rows
    stream = DataStream(train, 1, 0, 1, seed=cfg.data.seed)
    seen = {tuple(next(stream)["input_ids"][0, :24].tolist()) for _ in range(60)}  # two epochs
    held_rows = {tuple(data[i]["input_ids"][:24].tolist()) for i in held}
    assert len(seen) == 30 and seen.isdisjoint(held_rows)


def test_trim_padding_cuts_only_the_shared_padding():
    from engine.evaluate import trim_padding

    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    batch = {
        "input_ids": torch.arange(12).view(2, 6),
        "attention_mask": mask,
        "labels": mask * 5 - 100 * (1 - mask),
    }
    cut = trim_padding(batch)
    assert cut["input_ids"].shape == (2, 5) and torch.equal(cut["attention_mask"], mask[:, :5])
    assert trim_padding({k: v[:1, :1] for k, v in batch.items()})["input_ids"].shape == (1, 1)  # never longer


def test_evaluate_command_refuses_by_name(tmp_path, capsys):
    assert evaluate_main(["--config", str(CONFIG)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    split = ["--eval.split=0.5", "--data.num_samples=4", "--data.seq_len=128"]
    assert evaluate_main(["--config", str(CONFIG), "--checkpoint", str(tmp_path), *split]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert evaluate_main(["--config", str(CONFIG), "--model", str(tmp_path / "none"), *split]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_evaluate_command_on_a_lora_adapter_export(tmp_path):
    """--model on a LoRA export (an adapter directory): the adapter is put on the config's base model, so the
    loss is the merged model's, and not the base model's."""
    from engine.model import apply_lora, build_model

    run = [*RUN, "--eval.retrieval.lengths=[]", "--lora.enabled=true"]
    cfg = load_config(str(CONFIG), run)
    model = apply_lora(build_model(cfg.model, seed=cfg.optim.seed), cfg.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: an adapter that changes nothing would prove nothing
                p.copy_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.05
                )
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    losses = {}
    for name, source in (("adapter", ["--model", str(tmp_path / "adapter")]),
                         ("merged", ["--model", str(tmp_path / "merged")]), ("base", [])):  # fmt: skip
        out = tmp_path / f"cli-{name}"
        assert evaluate_main(["--config", str(CONFIG), *source, "--out", str(out), *run]) == 0
        losses[name] = json.loads((out / "evaluation.json").read_text())["eval/loss"]
    assert losses["adapter"] == pytest.approx(losses["merged"], rel=1e-10)
    assert abs(losses["adapter"] - losses["base"]) > 1e-3
