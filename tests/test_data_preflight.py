"""`python -m engine.data` is the launcher's pre-flight: on every bad-data case it exits 2 with the very `error:`
line launch/train.py prints (naming the file, record and field), no traceback; stdout holds only its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from one_rank import launcher, outputs

from engine.data.__main__ import main as data_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
SFT = REPO / "tests" / "data" / "sft"
TOKENIZER = str(SFT / "tokenizer")
FAST = [
    "--data.seq_len=64",
    "--chunking.chunk_size=32",
    "--data.num_samples=8",
    "--logging.progress_bar=false",
]
CHAT_MODEL = [
    f"--data.tokenizer={TOKENIZER}",
    "--model.hf_config.vocab_size=400",
    "--model.hf_config.pad_token_id=0",
]
CHAT_MODEL += ["--model.hf_config.bos_token_id=1", "--model.hf_config.eos_token_id=1"]
GOOD_CHAT = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)


def case_files(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, a piece of the expected error)."""
    (root / "bad_utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (root / "bad_utf8.txt").write_bytes(b"caf\xe9")
    (root / "json.parquet").write_text('{"text": "json"}\n')
    (root / "no_field.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (root / "long.jsonl").write_text(json.dumps({"text": "x" * 200}) + "\n")
    (root / "chat.parquet").write_text(GOOD_CHAT + "\n")
    (root / "no_answer.jsonl").write_text(
        GOOD_CHAT + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    )
    (root / "robot.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    (root / "pc.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    (root / "pc.csv").write_text("prompt,completion\na,b\nc,\n")
    (root / "broken.json").write_text('{"text": "a",\n')
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_bytes(b'{"model": "caf\xe9')
    docs = ["--data.kind=documents"]
    chat, pc = ["--data.kind=chat", *CHAT_MODEL], ["--data.kind=prompt_completion", *CHAT_MODEL]

    def at(name: str) -> str:
        return f"--data.path={root}/{name}"

    return {
        "non-UTF-8 jsonl": ([*docs, at("bad_utf8.jsonl")], "bad_utf8.jsonl' is not UTF-8 text"),
        "non-UTF-8 text": (["--data.kind=text", at("bad_utf8.txt")], "not UTF-8"),
        "non-parquet": ([*docs, at("json.parquet")], "json.parquet' is not a readable parquet"),
        "missing field": ([*docs, at("no_field.jsonl")], "no_field.jsonl, line 2: field 'text'"),
        "too long": (
            [*docs, at("long.jsonl"), "--data.packing=false", "--data.truncation=error"],
            "long.jsonl, line 1: document of 202 tokens",
        ),
        "missing path": ([*docs, at("nope.jsonl")], "nope.jsonl' not found"),
        "broken json": ([*docs, at("broken.json")], "broken.json' as json"),
        "chat as parquet": ([*chat, at("chat.parquet")], "chat.parquet' is not a readable parquet"),
        "chat without answer": ([*chat, at("no_answer.jsonl")], "no_answer.jsonl, line 2: messages"),
        "chat unknown role": ([*chat, at("robot.jsonl")], "robot.jsonl, line 1: messages[0].role"),
        "pc missing field": ([*pc, at("pc.jsonl")], "pc.jsonl, line 2: no field 'completion'"),
        "pc csv empty value": ([*pc, at("pc.csv")], "pc.csv, record 1 (0-based): no field 'completion'"),
        "bad tokenizer": ([f"--data.tokenizer={root}/tok"], "tokenizer.json"),
    }


def test_every_bad_data_case_is_the_launchers_error_line(tmp_path, capsys):
    main = launcher().main
    for name, (overrides, needle) in case_files(tmp_path).items():
        args = ["--config", CONFIG, *FAST, *outputs(tmp_path), *overrides]
        assert data_main([*args, "--inspect", "1"]) == 2, name
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert out == "" and len(errors) == 1 and needle in errors[0], (name, err)
        assert "Traceback" not in err, name
        assert main(args) == 2, name
        assert [
            line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")
        ] == errors, name
    assert not (tmp_path / "log").exists()


def test_stdout_is_only_the_report_and_the_summary_counts_split_tokens(tmp_path):
    """A fresh interpreter (DeepSpeed's logger binds the stdout it finds at import): stdout starts with the
    first row and holds the summary; nothing of DeepSpeed's there."""
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "y" * 150}) + "\n" + json.dumps({"text": "short"}) + "\n")
    args = ["--config", CONFIG, *FAST, "--data.kind=documents", f"--data.path={path}", "--data.packing=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "engine.data", *args, "--inspect", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("--- row 0 of documents data"), r.stdout[:500]
    assert "DeepSpeed" not in r.stdout and "accelerator" not in r.stdout and "[WARNING]" not in r.stdout
    assert "documents: 2, 159 tokens, one per row; 1 longer than seq_len 64: split over 3 rows" in r.stdout


@pytest.mark.parametrize("packing", [True, False])
def test_summary_counts_what_is_dropped(tmp_path, capsys, packing):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "y" * 150}) + "\n" + json.dumps({"text": "short"}) + "\n")
    args = [
        "--config",
        CONFIG,
        *FAST,
        "--data.kind=documents",
        f"--data.path={path}",
        f"--data.packing={packing}",
    ]
    if not packing:
        args.append("--data.truncation=drop")
    assert data_main([*args, "--inspect", "0"]) == 0
    out = capsys.readouterr().out
    if packing:  # 159 tokens: two full rows of 64, the last 31 tokens dropped and counted
        assert "rows: 2 of 64 tokens" in out and "the 31 tokens after the last full row dropped" in out
    else:
        assert "rows: 1 of 64 tokens" in out and "1 longer than seq_len 64: dropped, 152 tokens" in out
