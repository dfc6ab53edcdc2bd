"""Hub ids for model.name_or_path and data.tokenizer: a model in the HF cache (a test HF_HOME laid out as the hub
client lays it out) loads by id offline; offline and not cached is exit 2 naming the id, before anything starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "sft" / "tokenizer"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with testorg/tiny-llama cached: hub/models--testorg--tiny-llama/{refs/main, snapshots/REV/}."""
    from transformers import LlamaConfig, LlamaForCausalLM

    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--testorg--tiny-llama"
    snapshot = repo / "snapshots" / REVISION
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=400, pad_token_id=0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(snapshot)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


def run(home: Path, code_or_args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )


def test_cached_model_and_tokenizer_load_by_id_offline(hf_home, tmp_path):
    code = (
        "from engine.config_load import load_config\n"
        "from engine.model import build_model, model_vocab_size\n"
        "from engine.data import load_tokenizer\n"
        "cfg = load_config(None, ['--model.hf_config=null', '--model.name_or_path=testorg/tiny-llama',\n"
        "    '--data.tokenizer=testorg/tiny-llama', '--data.kind=prompt_completion',\n"
        f"    '--data.path={REPO}/tests/data/sft/prompt_completion.jsonl', '--logging.dir={tmp_path}/log',\n"
        f"    '--checkpoint.dir={tmp_path}/ckpt'])\n"
        "model = build_model(cfg.model, seed=0)\n"
        "tok = load_tokenizer(cfg.data.tokenizer)\n"
        "print(model_vocab_size(cfg.model), sum(p.numel() for p in model.parameters()), tok.encode('hello'))\n"
    )
    r = run(hf_home, ["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = hf_home / "hub" / "models--testorg--tiny-llama" / "snapshots" / REVISION
    ref = AutoModelForCausalLM.from_pretrained(snapshot)
    tok = AutoTokenizer.from_pretrained(snapshot)
    expected = (
        f"400 {sum(p.numel() for p in ref.parameters())} {tok.encode('hello', add_special_tokens=False)}"
    )
    assert r.stdout.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("key", ["model.name_or_path", "data.tokenizer"])
def test_uncached_id_offline_is_a_user_error_before_anything_starts(hf_home, tmp_path, key):
    args = [str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny-cpu.yaml")]
    args += [f"--logging.dir={tmp_path}/log", f"--checkpoint.dir={tmp_path}/ckpt", f"--{key}=testorg/missing"]
    if key == "model.name_or_path":
        args.append("--model.hf_config=null")
    r = run(hf_home, args, tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert f"{key}: 'testorg/missing' is not a local directory" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert "hf download testorg/missing" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "log").exists() and not (tmp_path / "ckpt").exists()
