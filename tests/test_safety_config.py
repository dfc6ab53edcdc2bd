"""Hostile configs are refused up front: an alias bomb, non-UTF-8 YAML, unbounded values in
messages, output directories that are files or not writable. All before any process group: in this process."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from one_rank import launcher

from engine.config import ConfigError
from engine.config_load import MAX_YAML_ALIASES, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def bomb(levels: int = 6, width: int = 9) -> str:
    """The 'billion laughs' shape: each anchor is a list of `width` aliases of the previous one."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.read_text() + "\n" + text + "\n")
    return str(path)


def test_alias_bomb_is_refused_while_parsing(tmp_path):
    # 9**6 = 531441 leaves from a 400-byte value: without the bound the type error renders all of them.
    path = write(tmp_path, "extra:\n  " + bomb().replace("\n", "\n  "))
    with pytest.raises(ConfigError) as e:
        load_config(path, [], check_paths=False)
    msg = str(e.value)
    assert f"more than {MAX_YAML_ALIASES} aliases" in msg and "c.yaml" in msg and "line" in msg
    assert len(msg) < 600


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.read_text().replace("seq_len: 2048", "seq_len: &len 2048") + "\nx_len: *len\n")
    with pytest.raises(ConfigError, match="unknown section 'x_len'|x_len"):  # the alias resolved; key unknown
        load_config(str(path), [], check_paths=False)


def test_unbounded_value_is_cut_in_the_message(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(str(CONFIG), ["--data.seq_len=[" + ", ".join(["123456789"] * 20000) + "]"])
    assert "data.seq_len" in str(e.value) and len(str(e.value)) < 400


def test_non_utf8_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(CONFIG.read_bytes() + b"\n# caf\xe9 au lait\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte \d+, line \d+"):
        load_config(str(path), [])


@pytest.mark.parametrize("key", ["checkpoint.dir", "logging.dir"])
@pytest.mark.parametrize("case", ["is a file", "under a file"])
def test_output_dir_that_is_a_file_is_refused(tmp_path, key, case):
    (tmp_path / "f").write_text("")
    value = tmp_path / "f" if case == "is a file" else tmp_path / "f" / "sub"
    with pytest.raises(ConfigError, match=rf"^{key}: .*'{tmp_path / 'f'}' is a file, not a directory"):
        load_config(str(CONFIG), [f"--{key}={value}"])


@pytest.mark.parametrize("key", ["checkpoint.dir", "logging.dir"])
def test_output_dir_that_is_not_writable_is_refused(tmp_path, key, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores the mode bits: ask the same question the check asks
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    try:
        with pytest.raises(ConfigError, match=rf"^{key}: '{ro}/out' is not writable \('{ro}' is not\)"):
            load_config(str(CONFIG), [f"--{key}={ro}/out"])
    finally:
        ro.chmod(0o700)


def test_launcher_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    code = launcher().main(
        ["--config", str(CONFIG), f"--checkpoint.dir={tmp_path}/f", f"--logging.dir={tmp_path}/log"]
    )
    assert code == 2 and capsys.readouterr().err.startswith("error: checkpoint.dir: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ------------------------------------------------------------------- input files: which file, what is wrong


def launcher_main(tmp_path: Path, capsys, *overrides: str) -> tuple[int, str]:
    out = [f"--logging.dir={tmp_path}/out/log", f"--checkpoint.dir={tmp_path}/out/ckpt"]
    code = launcher().main(
        ["--config", str(CONFIG), "--data.seq_len=128", "--chunking.chunk_size=64", *out, *overrides]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "out").exists(), "a failed start writes nothing"
    return code, err[-1] if err else ""


@pytest.mark.parametrize(
    "kind,name,data,needle",
    [
        (
            "jsonl",
            "d.jsonl",
            b'{"text": "hello"}\n{"text": "caf\xe9"}\n',
            "is not UTF-8 text: byte 31 (line 2)",
        ),
        ("text", "d.txt", b"hello \xff world", "is not UTF-8 text: byte 6 (line 1)"),
        ("parquet", "d.parquet", b'{"text": "json, not parquet"}\n', "is not a readable parquet file"),
    ],
)
def test_bad_data_file_names_the_file_and_place(tmp_path, capsys, kind, name, data, needle):
    (tmp_path / name).write_bytes(data)
    code, err = launcher_main(tmp_path, capsys, f"--data.kind={kind}", f"--data.path={tmp_path / name}")
    assert code == 2 and f"{kind} data file '{tmp_path / name}' {needle}" in err, err


@pytest.mark.parametrize(
    "content,needle",
    [
        (b'{"model": "caf\xe9"}', "is not UTF-8 text: byte 14 (line 1)"),
        (b'{"model": ', "is not valid JSON: line 1"),
    ],
)
def test_bad_tokenizer_file_is_named(tmp_path, content, needle):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"^data.tokenizer: file '.*tokenizer.json' {re.escape(needle)}"):
        load_config(str(CONFIG), [f"--data.tokenizer={tmp_path / 'tok'}"])


def test_truncated_safetensors_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=259)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    args = [f"--model.name_or_path={tmp_path / 'm'}", "--model.hf_config=null"]
    with pytest.raises(
        ValueError, match=r"^model.name_or_path: file '.*model.safetensors' is truncated: \d+ bytes"
    ):
        load_config(str(CONFIG), args)


def test_model_directory_without_weights_is_named(tmp_path, capsys):
    """config.json but no weight file: the launcher refuses it before any process group, naming the key
    (transformers said it after the group had started, naming none); config load, which planning and data
    inspection share, still takes it (they read only the config)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=259)  # fmt: skip
    cfg.save_pretrained(tmp_path / "m")
    args = [f"--model.name_or_path={tmp_path / 'm'}", "--model.hf_config=null"]
    load_config(str(CONFIG), args)
    code, err = launcher_main(tmp_path, capsys, *args)
    assert code == 2 and err.startswith(f"error: model.name_or_path: '{tmp_path / 'm'}' holds no weights"), (
        err
    )


# --------------------------------------------------------------------------- sizes that cannot fit the host


@pytest.mark.parametrize(
    "override,key",
    [
        ("--data.seq_len=1000000000", "data.seq_len=1000000000"),
        ("--data.num_samples=1000000000000", "data.num_samples"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_before_the_run(tmp_path, capsys, override, key):
    code, err = launcher_main(tmp_path, capsys, override)
    assert code == 2 and err.startswith(f"error: {key}") and "GiB of host memory" in err, err


def test_host_memory_bound_compares_with_the_host():
    from engine.host_memory import GiB, check_host_memory, needed_per_rank

    cfg = load_config(str(CONFIG), ["--data.seq_len=4096", "--chunking.chunk_size=256"])
    need = sum(needed_per_rank(cfg, 1, cuda=False).values())
    assert 2**20 < need < GiB  # the tiny model: ~9 MiB at 4K tokens
    check_host_memory(cfg, 1, cuda=False, host_bytes=need)  # just fits
    with pytest.raises(ValueError, match="data.seq_len=4096: this run needs at least"):
        check_host_memory(cfg, 1, cuda=False, host_bytes=need - 1)


# ------------------------------------------------------------------------------ two runs, one logging.dir


def test_second_fresh_run_keeps_the_first_runs_metrics(tmp_path, capsys):
    from engine.config import LoggingConfig
    from engine.metrics import Metrics

    log = tmp_path / "log"
    log.mkdir()
    first = '{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.4}\n'
    (log / "metrics.jsonl").write_text(first)
    cfg = LoggingConfig(dir=str(log), tensorboard=False, progress_bar=False)
    Metrics(cfg, total_steps=3, start_step=0, enabled=True).close()  # a fresh run: no checkpoint
    assert (log / "metrics.1.jsonl").read_text() == first
    assert "moved to metrics.1.jsonl" in capsys.readouterr().err
    (log / "metrics.jsonl").write_text(first)
    Metrics(cfg, total_steps=3, start_step=1, enabled=True).close()  # a resume at step 1: continues the file
    assert (log / "metrics.jsonl").read_text() == first.splitlines()[0] + "\n"
    assert not (log / "metrics.2.jsonl").exists()
