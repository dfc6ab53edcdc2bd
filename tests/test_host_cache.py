"""The dataset tokenized once per host: concurrent ranks build it once and load the same rows; a changed
input file builds anew; a user error reaches the waiting ranks at once; no cache outside a private dir."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.config import DataConfig
from engine.data import build_dataset, load_tokenizer
from engine.data.host_cache import build_dataset_once_per_host, once_per_host

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "tests" / "data" / "sft"
RANK = """
import sys, time
from pathlib import Path
from engine.config import DataConfig
from engine.data import build_dataset, load_tokenizer
from engine.data.host_cache import dataset_key, once_per_host
root, data = Path(sys.argv[1]), sys.argv[2]
cfg = DataConfig(kind="chat", path=data, tokenizer=sys.argv[3], seq_len=256, packing=True)
tok = load_tokenizer(cfg.tokenizer)
def build():
    with open(root / "builds", "a") as f:
        f.write("built\\n")
    time.sleep(2)  # the other rank arrives meanwhile and waits
    return build_dataset(cfg, tok, 400)
ds = once_per_host(dataset_key(cfg, 400, False), build, root / "cache")
print("ROWS", len(ds), sum(int(ds[i]["input_ids"].sum()) for i in range(len(ds))))
"""


def chat_cfg(path: Path) -> DataConfig:
    return DataConfig(
        kind="chat", path=str(path), tokenizer=str(SFT / "tokenizer"), seq_len=256, packing=True
    )


def test_concurrent_ranks_build_once(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_bytes((SFT / "chat.jsonl").read_bytes())
    cmd = [sys.executable, "-c", RANK, str(tmp_path), str(data), str(SFT / "tokenizer")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ranks = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [r.communicate(timeout=300) for r in ranks]
    assert all(r.returncode == 0 for r in ranks), [o[1][-2000:] for o in outs]
    rows = [o[0].split("ROWS")[-1].strip() for o in outs]
    assert (tmp_path / "builds").read_text() == "built\n"  # one rank tokenized, the other loaded
    assert rows[0] == rows[1]
    assert oct((tmp_path / "cache").stat().st_mode & 0o777) == "0o700"


def test_loaded_rows_equal_a_fresh_build_and_a_changed_file_builds_anew(tmp_path, monkeypatch):
    import engine.data

    data = tmp_path / "chat.jsonl"
    data.write_bytes((SFT / "chat.jsonl").read_bytes())
    cfg, tok, builds = chat_cfg(data), load_tokenizer(str(SFT / "tokenizer")), []

    def counted(*args):
        builds.append(1)
        return build_dataset(*args)

    monkeypatch.setattr(engine.data, "build_dataset", counted)

    def get():
        return build_dataset_once_per_host(cfg, tok, 400, False, root=tmp_path / "cache")

    first, again = get(), get()
    fresh = build_dataset(cfg, tok, 400)
    assert len(builds) == 1 and len(again) == len(fresh) == len(first)
    for i in range(len(fresh)):
        for k in fresh[i]:
            assert torch.equal(again[i][k], fresh[i][k])
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")  # one record fewer: another fingerprint
    assert len(get().samples) == len(fresh.samples) - 1 and len(builds) == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_a_user_error_reaches_the_waiting_rank_without_a_second_build(tmp_path):
    builds, errors, started = [], [], threading.Event()

    def failing_build():
        builds.append(1)
        started.set()
        time.sleep(1)
        raise ValueError("data.jsonl, line 3: messages[0].role: missing")

    def rank():
        try:
            once_per_host({"k": 1}, failing_build, tmp_path)
        except ValueError as e:
            errors.append(str(e))

    first = threading.Thread(target=rank)
    first.start()
    started.wait()
    second = threading.Thread(target=rank)  # waits on the lock while the first builds
    second.start()
    first.join()
    second.join()
    assert len(builds) == 1 and errors == ["data.jsonl, line 3: messages[0].role: missing"] * 2
    with pytest.raises(ValueError, match="role: missing"):  # a later run (not waiting then) builds itself
        once_per_host({"k": 1}, failing_build, tmp_path)
    assert len(builds) == 2


@pytest.mark.parametrize("case", ["open to others", "a symlink"])
def test_no_cache_outside_a_private_directory(tmp_path, case):
    target = tmp_path / "shared"
    target.mkdir(mode=0o777)
    target.chmod(0o777)
    root = target
    if case == "a symlink":
        target.chmod(0o700)
        root = tmp_path / "link"
        root.symlink_to(target)
    assert once_per_host({"k": 2}, lambda: 41, root) == 41
    assert list(target.iterdir()) == []  # built in the process, nothing written there
