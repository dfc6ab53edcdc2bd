"""Tests for engine.data: tokenizers, synthetic tasks, file datasets, batching and exact resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from engine.data import (
    IGNORE_INDEX,
    SYNTHETIC_TASKS,
    ByteTokenizer,
    DataStream,
    PackedDataset,
    PaddedDataset,
    SyntheticDataset,
    build_dataset,
    check_vocab,
    collate,
    load_file_dataset,
    load_tokenizer,
)

BYTE = ByteTokenizer()
REPO = Path(__file__).resolve().parents[1]

# Documents of different lengths; one holds blank lines (must stay ONE document in "text" mode) and
# one holds non-ASCII text (multi-byte UTF-8).
DOCS = [
    "alpha beta gamma",
    "first paragraph\n\nsecond paragraph after a blank line\n",
    "x" * 50,
    "héllo wörld ✓",
    "short",
]


class NoSpecialByteTokenizer(ByteTokenizer):
    """Byte tokenizer without bos/eos, to reach the "fewer than 2 tokens" check and pad-only ids."""

    bos_token_id = None
    eos_token_id = None


def _doc_ids(text: str) -> list[int]:
    return [BYTE.bos_token_id, *text.encode("utf-8"), BYTE.eos_token_id]


def _write(kind: str, root: Path, docs: list, field: str = "text") -> Path:
    """Write ``docs`` as one jsonl file, one parquet file, or a directory with one text file per doc."""
    if kind == "jsonl":
        path = root / "data.jsonl"
        path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
        return path
    if kind == "parquet":
        import datasets

        path = root / "data.parquet"
        datasets.Dataset.from_dict({field: docs}).to_parquet(str(path))
        return path
    path = root / "texts"
    path.mkdir()
    for i, d in enumerate(docs):
        (path / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer saved as an HF tokenizer directory (built locally, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["The pass key is 12345. What is the pass key? hello world"] * 20, trainer)
    path = tmp_path_factory.mktemp("hf_tok")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    text = "Hello, wörld ✓ 世界\n\tend"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert BYTE.decode(ids) == text
    assert BYTE.decode(torch.tensor(ids)) == text
    with_specials = BYTE.encode(text, add_special_tokens=True)
    assert with_specials[0] == 257 and with_specials[-1] == 258 and with_specials[1:-1] == ids
    assert BYTE.decode(with_specials) == "<bos>" + text + "<eos>"
    assert BYTE.decode(with_specials + [256], skip_special_tokens=True) == text
    assert (BYTE.pad_token_id, BYTE.bos_token_id, BYTE.eos_token_id, BYTE.vocab_size, len(BYTE)) == (
        256,
        257,
        258,
        259,
        259,
    )
    with pytest.raises(ValueError, match="259"):
        BYTE.decode([65, 259])


def test_load_tokenizer(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_tokenizer(str(missing))
    hf = load_tokenizer(str(hf_tokenizer_dir))
    ids = hf.encode("hello world", add_special_tokens=False)
    assert hf.decode(ids) == "hello world"
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.pad_token_id == 0


# ----------------------------------------------------------------------------------------------------
# Synthetic tasks
# ----------------------------------------------------------------------------------------------------


def _answer(sample: dict[str, torch.Tensor]) -> torch.Tensor:
    return sample["input_ids"][sample["labels"] != IGNORE_INDEX]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("seq_len", [96, 1000, 4097])
def test_synthetic_shape_vocab_and_labels(task: str, seq_len: int) -> None:
    ds = SyntheticDataset(task, seq_len, num_samples=6, seed=3)
    assert len(ds) == 6
    answer_len = 4 if task == "kv_recall" else 5
    for i in range(len(ds)):
        s = ds[i]
        assert set(s) == {"input_ids", "labels", "attention_mask"}
        for v in s.values():
            assert v.shape == (seq_len,) and v.dtype == torch.long
        ids = s["input_ids"]
        assert ids[0] == BYTE.bos_token_id
        assert int(ids.min()) >= 0 and int(ids.max()) < BYTE.vocab_size
        assert bool((s["attention_mask"] == 1).all())
        # Labels exactly on the final answer tokens, equal to the inputs there, -100 elsewhere.
        labelled = (s["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(seq_len - answer_len, seq_len))
        assert torch.equal(s["labels"][-answer_len:], ids[-answer_len:])
    assert ds.max_token_id() == BYTE.bos_token_id


def test_kv_recall_is_solvable_from_the_header() -> None:
    ds = SyntheticDataset("kv_recall", 2048, num_samples=20, seed=0)
    queried = set()
    for i in range(len(ds)):
        s = ds[i]
        text = BYTE.decode(s["input_ids"], skip_special_tokens=True)
        header, _, rest = text.partition("\n")
        pairs = dict(p.split("=") for p in header.rstrip(";").split(";"))
        assert len(pairs) == 4 and all(len(k) == 4 and len(v) == 4 for k, v in pairs.items())
        query = re.fullmatch(r"(?s).*\n\?(\w{4}):(\w{4})", rest)
        assert query is not None, rest[-40:]
        key, value = query.groups()
        answer = BYTE.decode(_answer(s))
        assert answer == value == pairs[key]
        # The only "=", "?" and ":" are in the header and the query, so the filler cannot leak the answer.
        filler = rest[: -len("\n?xxxx:xxxx")]
        assert re.fullmatch(r"[a-z ]*", filler), filler[:80]
        assert len(filler) > 1900
        queried.add(list(pairs).index(key))
    assert len(queried) > 1  # the queried pair varies


def test_passkey_is_solvable_and_placed_early() -> None:
    seq_len = 3000
    ds = SyntheticDataset("passkey", seq_len, num_samples=20, seed=0)
    starts = []
    for i in range(len(ds)):
        s = ds[i]
        text = BYTE.decode(s["input_ids"])  # byte tokenizer: character offset == token offset here
        m = re.search(r"The pass key is (\d{5})\. Remember it\.", text)
        assert m is not None
        answer = BYTE.decode(_answer(s))
        assert re.fullmatch(r"\d{5}", answer)
        assert answer == m.group(1)
        assert text.endswith("What is the pass key? The pass key is " + answer)
        start = m.start() - len("<bos>") + 1
        assert start < seq_len // 10
        starts.append(start)
    assert len(set(starts)) > 5  # the position is random


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_synthetic_deterministic_per_seed(task: str) -> None:
    a = SyntheticDataset(task, 512, num_samples=4, seed=7)
    b = SyntheticDataset(task, 512, num_samples=4, seed=7)
    c = SyntheticDataset(task, 512, num_samples=4, seed=8)
    # Access order must not matter (samples are generated lazily from (seed, index)).
    b_items = {i: b[i] for i in reversed(range(4))}
    for i in range(4):
        assert torch.equal(a[i]["input_ids"], b_items[i]["input_ids"])
        assert torch.equal(a[i]["labels"], b_items[i]["labels"])
        assert not torch.equal(a[i]["input_ids"], c[i]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    with pytest.raises(IndexError):
        a[4]


def test_synthetic_with_hf_tokenizer(hf_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(hf_tokenizer_dir))
    for task in SYNTHETIC_TASKS:
        ds = SyntheticDataset(task, 700, num_samples=3, seed=1, tokenizer=tok)
        for i in range(3):
            s = ds[i]
            assert s["input_ids"].shape == (700,)
            assert int(s["input_ids"][0]) == tok.bos_token_id
            assert int(s["input_ids"].max()) <= ds.max_token_id() < len(tok)
            answer = tok.decode(_answer(s).tolist())
            assert re.fullmatch(r"\w{4}" if task == "kv_recall" else r"\d{5}", answer), answer
            assert answer in tok.decode(s["input_ids"][: 700 // 2].tolist())  # stated early on


def test_synthetic_errors() -> None:
    with pytest.raises(ValueError, match="unknown synthetic task"):
        SyntheticDataset("copy", 128, 1)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        SyntheticDataset("passkey", 1, 1)
    with pytest.raises(ValueError, match=r"seq_len 40 is too short .*needs at least \d+"):
        SyntheticDataset("kv_recall", 40, 1)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticDataset("passkey", 128, 0)


# ----------------------------------------------------------------------------------------------------
# File datasets
# ----------------------------------------------------------------------------------------------------

KINDS = ["jsonl", "parquet", "text"]


@pytest.mark.parametrize("kind", KINDS)
def test_file_packed(kind: str, tmp_path: Path) -> None:
    seq_len = 16
    path = _write(kind, tmp_path, DOCS)
    ds = load_file_dataset(kind, path, BYTE, seq_len=seq_len, packing=True)
    assert isinstance(ds, PackedDataset)
    stream = [t for d in DOCS for t in _doc_ids(d)]
    assert len(ds) == len(stream) // seq_len
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].tolist() == stream[i * seq_len : (i + 1) * seq_len]
        assert torch.equal(s["labels"], s["input_ids"])
        assert bool((s["attention_mask"] == 1).all())
    assert ds.num_documents == len(DOCS)


@pytest.mark.parametrize("kind", KINDS)
def test_file_split_and_pad(kind: str, tmp_path: Path) -> None:
    """packing false: one document per row, a document longer than seq_len split over several rows, so the
    rows together hold every token of every document, in order."""
    seq_len = 24
    path = _write(kind, tmp_path, DOCS)
    ds = load_file_dataset(kind, path, BYTE, seq_len=seq_len, packing=False)
    assert isinstance(ds, PaddedDataset)
    pieces = [ids[i : i + seq_len] for ids in map(_doc_ids, DOCS) for i in range(0, len(ids), seq_len)]
    assert len(ds) == len(pieces) == len(DOCS) + 4  # two documents of 55 and 52 tokens make 3 rows each
    for i, ids in enumerate(pieces):
        s = ds[i]
        n = len(ids)
        assert s["input_ids"].tolist() == ids + [BYTE.pad_token_id] * (seq_len - n)
        assert s["labels"].tolist() == ids + [IGNORE_INDEX] * (seq_len - n)
        assert s["attention_mask"].tolist() == [1] * n + [0] * (seq_len - n)
    assert ds.long_documents == 2 and ds.dropped_tokens == 0


def test_file_truncation_drop_and_error(tmp_path: Path) -> None:
    path = _write("jsonl", tmp_path, DOCS)
    ds = load_file_dataset("jsonl", path, BYTE, seq_len=24, packing=False, truncation="drop")
    kept = [d for d in DOCS if len(_doc_ids(d)) <= 24]
    assert [BYTE.decode(ds[i]["input_ids"], skip_special_tokens=True) for i in range(len(ds))] == kept
    assert ds.dropped_tokens == 55 + 52 and ds.long_documents == 2
    with pytest.raises(
        ValueError, match=r"data\.jsonl, line 2: document of 55 tokens, more than data.seq_len 24"
    ):
        load_file_dataset("jsonl", path, BYTE, seq_len=24, packing=False, truncation="error")
    # Packing cuts nothing short: only the tokens after the last full row are dropped, and counted.
    packed = load_file_dataset("jsonl", path, BYTE, seq_len=24, packing=True, truncation="error")
    total = sum(len(_doc_ids(d)) for d in DOCS)
    assert packed.dropped_tokens == total - 24 * len(packed) > 0


def test_jsonl_custom_field_and_directory_of_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "b.jsonl").write_text(json.dumps({"content": "second shard"}) + "\n")
    (shards / "a.jsonl").write_text("".join(json.dumps({"content": d, "n": 1}) + "\n" for d in DOCS[:2]))
    (shards / ".hidden").write_text("ignored")
    ds = load_file_dataset("jsonl", shards, BYTE, seq_len=64, packing=False, text_field="content")
    assert [BYTE.decode(ds[i]["input_ids"], skip_special_tokens=True) for i in range(len(ds))] == [
        *DOCS[:2],
        "second shard",
    ]


def test_file_data_with_hf_tokenizer_and_single_text_file(tmp_path: Path, hf_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(hf_tokenizer_dir))
    path = tmp_path / "book.txt"
    path.write_text(DOCS[1], encoding="utf-8")  # blank line inside: still one document
    ds = load_file_dataset("text", path, tok, seq_len=64, packing=False)
    assert len(ds) == 1
    ids = [tok.bos_token_id, *tok.encode(DOCS[1], add_special_tokens=False), tok.eos_token_id]
    assert ds[0]["input_ids"].tolist() == ids + [tok.pad_token_id] * (64 - len(ids))
    assert tok.decode(ds[0]["input_ids"][1 : len(ids) - 1].tolist()) == DOCS[1]


@pytest.mark.parametrize("kind", KINDS)
def test_missing_path(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.data"
    with pytest.raises(ValueError, match=f"not found: .*{re.escape(str(missing))}"):
        load_file_dataset(kind, missing, BYTE, seq_len=8)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_file(kind: str, tmp_path: Path) -> None:
    if kind == "parquet":
        import datasets

        path = tmp_path / "empty.parquet"
        datasets.Dataset.from_dict({"text": []}).to_parquet(str(path))
        pattern = "no records"
    else:
        path = tmp_path / f"empty.{kind}"
        path.write_text("")
        pattern = "is empty"
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}.*{pattern}"):
        load_file_dataset(kind, path, BYTE, seq_len=8)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no data files"):
        load_file_dataset("text", tmp_path, BYTE, seq_len=8)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_missing_text_field(kind: str, tmp_path: Path) -> None:
    path = _write(kind, tmp_path, DOCS, field="body")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*no field 'text'.*'body'"):
        load_file_dataset(kind, path, BYTE, seq_len=8)


def test_bad_records_are_located(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    # Record 2 sits on line 4: datasets skips the blank line, the message must still give the real line.
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"other": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 4: field 'text' is missing"):
        load_file_dataset("jsonl", path, BYTE, seq_len=8)
    path.write_text('{"text": "ok"}\n{"text": ""}\n')
    with pytest.raises(ValueError, match=r"line 2: document is empty"):
        load_file_dataset("jsonl", path, BYTE, seq_len=8, packing=True)
    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match="line 2: field 'text' is int, not a string"):
        load_file_dataset("jsonl", path, BYTE, seq_len=8)
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"could not read .*bad\.jsonl' as jsonl"):
        load_file_dataset("jsonl", path, BYTE, seq_len=8)


@pytest.mark.parametrize("packing", [True, False])
def test_document_shorter_than_two_tokens(tmp_path: Path, packing: bool) -> None:
    path = _write("jsonl", tmp_path, ["abc", "z", "def"])
    with pytest.raises(ValueError, match="line 2: document has 1 token"):
        load_file_dataset("jsonl", path, NoSpecialByteTokenizer(), seq_len=2, packing=packing)


def test_seq_len_too_small(tmp_path: Path) -> None:
    path = _write("jsonl", tmp_path, DOCS)
    for bad in (0, 1):
        with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
            load_file_dataset("jsonl", path, BYTE, seq_len=bad)


def test_packed_zero_blocks(tmp_path: Path) -> None:
    path = _write("jsonl", tmp_path, ["tiny"])  # bos + 4 bytes + eos = 6 tokens
    with pytest.raises(ValueError, match=r"data has 6 tokens, fewer than seq_len 7"):
        load_file_dataset("jsonl", path, BYTE, seq_len=7, packing=True)
    assert len(load_file_dataset("jsonl", path, BYTE, seq_len=6, packing=True)) == 1


def test_check_vocab(tmp_path: Path) -> None:
    path = _write("jsonl", tmp_path, ["plain ascii", "ÿ here", "more"])  # "ÿ" is bytes 195, 191
    ds = load_file_dataset("jsonl", path, BYTE, seq_len=8)
    check_vocab(ds, 259)
    with pytest.raises(ValueError, match=r"token id 258 .*vocab_size=258"):
        check_vocab(ds, 258)
    raw = load_file_dataset("jsonl", path, NoSpecialByteTokenizer(), seq_len=8)
    check_vocab(raw, 196)
    with pytest.raises(ValueError, match=r"token id 195 \(first in document 1\)"):
        check_vocab(raw, 195)
    # Padding puts the pad id (256) into input_ids even without bos/eos: it must be in the vocab too.
    padded = load_file_dataset("jsonl", path, NoSpecialByteTokenizer(), seq_len=64, packing=False)
    with pytest.raises(ValueError, match="token id 256"):
        check_vocab(padded, 200)
    # Synthetic data with the byte tokenizer uses bos (257) but never eos / pad.
    check_vocab(SyntheticDataset("passkey", 128, 2), 258)
    with pytest.raises(ValueError, match="synthetic task 'passkey': token id 257"):
        check_vocab(SyntheticDataset("passkey", 128, 2), 257)


def test_file_loading_offline_leaves_no_cache_in_home(tmp_path: Path) -> None:
    """A fresh interpreter with HF_DATASETS_OFFLINE=1 loads local data and writes nothing under HOME."""
    path = _write("jsonl", tmp_path, DOCS)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    code = (
        "from engine.data import ByteTokenizer, load_file_dataset\n"
        f"ds = load_file_dataset('jsonl', {str(path)!r}, ByteTokenizer(), seq_len=16)\n"
        "print(len(ds))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(sum(len(_doc_ids(d)) for d in DOCS) // 16)
    assert list(home.iterdir()) == []


def test_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data kind 'csv'"):
        load_file_dataset("csv", tmp_path, BYTE, seq_len=8)


# ----------------------------------------------------------------------------------------------------
# Batching and resume
# ----------------------------------------------------------------------------------------------------


class IndexDataset(Dataset):
    """Sample i is [i, i, i]: batches reveal which samples they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = torch.full((3,), i, dtype=torch.long)
        return {"input_ids": t, "labels": t.clone(), "attention_mask": torch.ones_like(t)}


def _epoch_ids(stream: DataStream) -> list[int]:
    out: list[int] = []
    for _ in range(stream.batches_per_epoch):
        batch = next(stream)
        assert batch["input_ids"].shape == (stream.batch_size, 3)
        out += batch["input_ids"][:, 0].tolist()
    return out


def test_ranks_disjoint_and_covering() -> None:
    n, world, bs = 24, 3, 2
    streams = [DataStream(IndexDataset(n), bs, rank=r, world_size=world, seed=5) for r in range(world)]
    epochs = []
    for _epoch in range(2):
        per_rank = [_epoch_ids(s) for s in streams]
        assert all(len(ids) == n // world for ids in per_rank)
        flat = [i for ids in per_rank for i in ids]
        assert sorted(flat) == list(range(n))  # disjoint (no duplicates) and covering
        epochs.append(per_rank)
        assert all(s.epoch == _epoch + 1 and s.position == 0 for s in streams)
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    assert epochs[0][0] != list(range(0, n, world))  # shuffled


def test_uneven_split_gives_every_rank_the_same_number_of_batches() -> None:
    n, world, bs = 29, 3, 2  # 9 samples per rank -> 4 batches, 5 samples per epoch left out
    streams = [DataStream(IndexDataset(n), bs, rank=r, world_size=world, seed=1) for r in range(world)]
    assert {s.batches_per_epoch for s in streams} == {4}
    flat = [i for s in streams for i in _epoch_ids(s)]
    assert len(flat) == len(set(flat)) == 24


def test_unshuffled_order() -> None:
    s = DataStream(IndexDataset(8), 2, rank=1, world_size=2, shuffle=False)
    assert _epoch_ids(s) == [1, 3, 5, 7]


def test_resume_gives_identical_batches() -> None:
    ds = SyntheticDataset("kv_recall", 128, num_samples=10, seed=2)
    a = DataStream(ds, batch_size=2, rank=1, world_size=2, seed=9)  # 5 samples/rank -> 2 batches/epoch
    for _ in range(3):  # crosses an epoch boundary
        next(a)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["position"] == 1
    state = json.loads(json.dumps(state))  # checkpoints may store it as JSON
    expected = [next(a) for _ in range(5)]

    b = DataStream(ds, batch_size=2, rank=1, world_size=2, seed=9)
    b.load_state_dict(state)
    for want in expected:
        got = next(b)
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(got[k], want[k])
    # A fresh stream (no resume) would have produced different batches.
    fresh = DataStream(ds, batch_size=2, rank=1, world_size=2, seed=9)
    assert not torch.equal(next(fresh)["input_ids"], expected[0]["input_ids"])


def test_stream_errors() -> None:
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        DataStream(IndexDataset(7), 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        DataStream(IndexDataset(8), 1, rank=2, world_size=2)
    s = DataStream(IndexDataset(8), 2, world_size=2, seed=1)
    other = DataStream(IndexDataset(8), 2, world_size=1, seed=1).state_dict()
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        s.load_state_dict(other)
    bad = {**s.state_dict(), "position": 2}
    with pytest.raises(ValueError, match="position=2"):
        s.load_state_dict(bad)


def test_collate() -> None:
    ds = IndexDataset(3)
    batch = collate([ds[0], ds[2]])
    assert batch["input_ids"].tolist() == [[0, 0, 0], [2, 2, 2]]
    with pytest.raises(ValueError, match="different shapes"):
        collate([ds[0], {k: v[:2] for k, v in ds[1].items()}])


# ----------------------------------------------------------------------------------------------------
# Config entry point
# ----------------------------------------------------------------------------------------------------


def _cfg(**overrides: object) -> SimpleNamespace:
    base = dict(
        kind="synthetic",
        path=None,
        text_field="text",
        seq_len=256,
        packing=True,
        format="auto",
        truncation="split",
        mixture=None,
        num_samples=4,
        synthetic_task="passkey",
        seed=0,
    )
    base.update(overrides)
    return SimpleNamespace(**base)


def test_build_dataset(tmp_path: Path) -> None:
    syn = build_dataset(_cfg(synthetic_task="kv_recall"), BYTE, vocab_size=259)
    assert isinstance(syn, SyntheticDataset) and syn.task == "kv_recall" and len(syn) == 4
    assert syn[0]["input_ids"].shape == (256,)

    path = _write("jsonl", tmp_path, DOCS, field="body")
    cfg = _cfg(kind="jsonl", path=str(path), text_field="body", seq_len=8, packing=False)
    padded = build_dataset(cfg, BYTE)
    assert isinstance(padded, PaddedDataset) and len(padded) == sum(-(-len(_doc_ids(d)) // 8) for d in DOCS)
    packed = build_dataset(_cfg(kind="jsonl", path=str(path), text_field="body", seq_len=8), BYTE)
    assert isinstance(packed, PackedDataset)
    with pytest.raises(ValueError, match="token id 258"):
        build_dataset(cfg, BYTE, vocab_size=100)
    with pytest.raises(ValueError, match="needs a path"):
        build_dataset(_cfg(kind="parquet"), BYTE)
    with pytest.raises(ValueError, match="unknown data kind 'hdf5'"):
        build_dataset(_cfg(kind="hdf5"), BYTE)
