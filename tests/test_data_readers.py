"""Readers: the shipped tiny data converted to every format `datasets` reads gives the jsonl reader's rows, for
every data.kind; ShareGPT and key-mapped chat records give the `messages` masks; mixtures; bad files named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from engine.config import ConfigError, DataConfig, MixtureSource
from engine.data import ByteTokenizer, MixtureDataset, build_dataset, load_tokenizer

DATA = Path(__file__).resolve().parent / "data" / "sft"
TOKENIZER = str(DATA / "tokenizer")
REPO = Path(__file__).resolve().parents[1]


def records(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]


CHAT, PC = records("chat.jsonl"), records("prompt_completion.jsonl")
# Documents: every message of the shipped chat data, one document each.
DOCS = [{"text": m["content"]} for r in CHAT for m in r["messages"]]


def write(fmt: str, recs: list[dict], root: Path) -> Path:
    """``recs`` stored as ``fmt`` under ``root``; returns what data.path names."""
    ds = datasets.Dataset.from_list(recs)
    if fmt == "jsonl":
        path = root / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif fmt == "json":  # one JSON array
        path = root / "data.json"
        path.write_text(json.dumps(recs))
    elif fmt == "parquet":
        path = root / "data.parquet"
        ds.to_parquet(str(path))
    elif fmt == "csv":
        path = root / "data.csv"
        ds.to_csv(str(path), index=False)
    elif fmt == "text":  # one document per file
        path = root / "texts"
        path.mkdir()
        for i, r in enumerate(recs):
            (path / f"doc{i:03d}.txt").write_text(r["text"], encoding="utf-8")
    elif fmt == "save_to_disk":
        path = root / "saved"
        ds.save_to_disk(str(path))
    elif fmt == "arrow":  # one Arrow file (as save_to_disk writes its shards)
        ds.save_to_disk(str(root / "saved"))
        (path,) = (root / "saved").glob("*.arrow")
    elif fmt == "hub_layout":  # the hub's layout: two train shards, a test split and a README
        path = root / "repo"
        (path / "data").mkdir(parents=True)
        half = len(recs) // 2
        datasets.Dataset.from_list(recs[:half]).to_parquet(
            str(path / "data" / "train-00000-of-00002.parquet")
        )
        datasets.Dataset.from_list(recs[half:]).to_parquet(
            str(path / "data" / "train-00001-of-00002.parquet")
        )
        datasets.Dataset.from_list(recs[:1]).to_parquet(str(path / "data" / "test-00000-of-00001.parquet"))
        (path / "README.md").write_text("# a dataset card\n")
    else:
        raise AssertionError(fmt)
    return path


def rows(ds) -> list[dict[str, list[int]]]:
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


def build(kind: str, path: Path, **kw):
    tok = ByteTokenizer() if kind == "documents" else load_tokenizer(TOKENIZER)
    tokenizer = "byte" if kind == "documents" else TOKENIZER
    kw.setdefault("seq_len", 48)
    return build_dataset(DataConfig(kind=kind, path=str(path), tokenizer=tokenizer, **kw), tok)


CASES = [
    ("documents", DOCS, ["json", "parquet", "csv", "text", "save_to_disk", "arrow", "hub_layout"]),
    ("chat", CHAT, ["json", "parquet", "save_to_disk", "arrow", "hub_layout"]),
    ("prompt_completion", PC, ["json", "parquet", "csv", "save_to_disk", "arrow", "hub_layout"]),
]


@pytest.mark.parametrize(
    "kind,recs,fmt",
    [(k, r, f) for k, r, fmts in CASES for f in fmts],
    ids=lambda x: x if isinstance(x, str) else "",
)
@pytest.mark.parametrize("packing", [False, True])
def test_every_format_gives_the_jsonl_rows(tmp_path, kind, recs, fmt, packing):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = rows(build(kind, write("jsonl", recs, tmp_path / "a"), packing=packing))
    assert len(reference) > 1
    assert rows(build(kind, write(fmt, recs, tmp_path / "b"), packing=packing)) == reference


def test_documents_kinds_name_their_format(tmp_path):
    """kind parquet is kind documents with format parquet; a contradicting data.format is refused."""
    path = write("parquet", DOCS, tmp_path)
    assert rows(build("documents", path)) == rows(
        build_dataset(DataConfig(kind="parquet", path=str(path), seq_len=48), ByteTokenizer())
    )
    with pytest.raises(ConfigError, match="data.format: 'csv' contradicts data.kind 'parquet'"):
        DataConfig(kind="parquet", path=str(path), format="csv")
    with pytest.raises(ConfigError, match="data.format: 'text' holds plain documents"):
        DataConfig(kind="chat", path=str(path), tokenizer=TOKENIZER, format="text")


def sharegpt(record: dict) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in record["messages"]]}


def custom(record: dict) -> dict:
    names = {"user": "person", "assistant": "bot", "system": "system"}
    return {"turns": [{"speaker": names[m["role"]], "text": m["content"]} for m in record["messages"]]}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_sharegpt_and_key_maps_give_the_messages_masks(tmp_path, fmt):
    reference = build("chat", DATA / "chat.jsonl", seq_len=512)
    (tmp_path / "s").mkdir()
    (tmp_path / "c").mkdir()
    share = build(
        "chat", write(fmt, [sharegpt(r) for r in CHAT], tmp_path / "s"), seq_len=512, chat_format="sharegpt"
    )
    mapped = build(
        "chat",
        write(fmt, [custom(r) for r in CHAT], tmp_path / "c"),
        seq_len=512,
        messages_field="turns",
        chat_keys={"role": "speaker", "content": "text"},
        chat_roles={"bot": "assistant", "person": "user"},
    )
    for ds in (share, mapped):
        assert [(s.ids, s.loss) for s in ds.samples] == [(s.ids, s.loss) for s in reference.samples]
    # Negative control: without the role map the data's own role names are refused, naming the record.
    with pytest.raises(ValueError, match=r"record 0 \(0-based\)|line 1"):
        build(
            "chat",
            tmp_path / "c" / f"data.{fmt}",
            messages_field="turns",
            chat_keys={"role": "speaker", "content": "text"},
        )


def test_a_record_in_another_layout_is_named_with_the_setting_that_reads_it(tmp_path):
    """A missing field lists the record's fields and, for a known layout, the setting that reads it."""
    cases = [
        ("chat", [sharegpt(r) for r in CHAT], r"no field 'messages' .*fields are \['conversations'\] "
         r"\(as data.chat_format: sharegpt reads\)"),
        ("chat", PC, r"fields are \['completion', 'prompt'\] \(as data.kind: prompt_completion reads\)"),
        ("prompt_completion", CHAT, r"no field 'prompt' .*\(as data.kind: chat \(data.chat_format: messages\)"),
        ("chat", [{"dialog": 1}], r"line 1: no field 'messages' \(data.messages_field\) in the record; its "
         r"fields are \['dialog'\]$"),
    ]  # fmt: skip
    for i, (kind, recs, error) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(ValueError, match=error):
            build(kind, write("jsonl", recs, tmp_path / str(i)))


def test_chat_mapping_keys_are_checked():
    with pytest.raises(ConfigError, match=r"data.chat_roles: \['robot'\] not among"):
        DataConfig(kind="chat", path="x.jsonl", tokenizer=TOKENIZER, chat_roles={"bot": "robot"})
    with pytest.raises(ConfigError, match=r"data.chat_keys: unknown \['speaker'\]"):
        DataConfig(kind="chat", path="x.jsonl", tokenizer=TOKENIZER, chat_keys={"speaker": "from"})
    with pytest.raises(ConfigError, match="data.chat_format: 'sharegpt' applies to data.kind chat only"):
        DataConfig(kind="documents", path="x.jsonl", chat_format="sharegpt")


def mixture_of(tmp_path: Path, weights: list[float], seed: int = 0) -> MixtureDataset:
    paths = []
    for i, n in enumerate((40, 10)):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"dataset {i} document {j}"}) + "\n" for j in range(n)))
        paths.append(path)
    mixture = [MixtureSource(path=str(p), weight=w) for p, w in zip(paths, weights)]
    cfg = DataConfig(kind="documents", mixture=mixture, seq_len=64, packing=False, seed=seed)
    return build_dataset(cfg, ByteTokenizer())


def test_mixture_proportions_and_determinism(tmp_path):
    tok = ByteTokenizer()
    mix = mixture_of(tmp_path, [1.0, 3.0])
    n = len(mix)
    assert n == 50  # as many rows as the datasets have together
    texts = [tok.decode(mix[i]["input_ids"], skip_special_tokens=True) for i in range(n)]
    share = sum(t.startswith("dataset 1") for t in texts) / n
    sigma = (0.75 * 0.25 / n) ** 0.5
    assert abs(share - 0.75) <= 4 * sigma  # the small dataset is drawn 3x as often, so its rows repeat
    assert mix.drawn() == [n - round(share * n), round(share * n)]
    small = [t for t in texts if t.startswith("dataset 1")]
    assert len(set(small)) == 10  # every row of the small dataset before any repeats (cyclic order)
    assert texts == [
        tok.decode(x["input_ids"], skip_special_tokens=True) for x in mixture_of(tmp_path, [1.0, 3.0])
    ]
    other = mixture_of(tmp_path, [1.0, 3.0], seed=1)
    assert texts != [tok.decode(other[i]["input_ids"], skip_special_tokens=True) for i in range(n)]
    with pytest.raises(ConfigError, match=r"data.mixture\[\].weight: must be > 0"):
        MixtureSource(path="a.jsonl", weight=0)
    with pytest.raises(ConfigError, match="set only one of data.path and data.mixture"):
        DataConfig(kind="documents", path="a.jsonl", mixture=[MixtureSource(path="b.jsonl")])


def test_a_chat_mixture_of_two_layouts(tmp_path):
    """data.mixture[].chat_format: a messages dataset and a ShareGPT one in one mixture give the rows of the
    same mixture of two messages datasets; the key applies to chat only."""
    (tmp_path / "s").mkdir()
    (tmp_path / "m").mkdir()
    share = write("jsonl", [sharegpt(r) for r in CHAT], tmp_path / "s")
    twin = write("jsonl", CHAT, tmp_path / "m")
    tok = load_tokenizer(TOKENIZER)

    def mixture(second: MixtureSource) -> list[dict]:
        cfg = DataConfig(kind="chat", tokenizer=TOKENIZER, seq_len=512, packing=False,
                         mixture=[MixtureSource(path=str(DATA / "chat.jsonl")), second])  # fmt: skip
        return rows(build_dataset(cfg, tok))

    assert mixture(MixtureSource(path=str(share), chat_format="sharegpt")) == mixture(
        MixtureSource(path=str(twin))
    )
    with pytest.raises(ValueError, match="no field 'messages'"):  # without it: the mixture's data.chat_format
        mixture(MixtureSource(path=str(share)))
    with pytest.raises(
        ConfigError, match=r"data.mixture\[0\].chat_format: 'sharegpt' applies to data.kind chat"
    ):
        DataConfig(kind="documents", mixture=[MixtureSource(path=str(share), chat_format="sharegpt")])


def test_mixture_large_sample_proportions(tmp_path):
    mix = MixtureDataset(
        [range(1000), range(1000), range(1000)], [0.5, 0.3, 0.2], seed=3, names=["a", "b", "c"]
    )
    share = np.bincount(mix.which) / len(mix)
    assert np.all(np.abs(share - [0.5, 0.3, 0.2]) <= 4 * np.sqrt(np.array([0.25, 0.21, 0.16]) / 3000))


BAD_FILES = [
    (
        "data.parquet",
        b'{"text": "jsonl, not parquet"}\n',
        r"data.parquet' is not a readable parquet file \(expected parquet",
    ),
    (
        "data.jsonl",
        b'{"text": "caf\xe9"}\n',
        r"data.jsonl' is not UTF-8 text: byte 13 \(line 1\).*\(expected jsonl",
    ),
    ("data.csv", b"text\n\xff\xfe\n", r"data.csv' is not UTF-8 text.*\(expected csv"),
    (
        "data.json",
        b"[{'text': 1}]",
        r"could not read .*data.json' as json \(expected json from the extension",
    ),
    (
        "data.bin",
        b"x",
        r"data.bin.: cannot tell its format from the extension; set data.format to one of jsonl, json, parquet",
    ),
]


@pytest.mark.parametrize("name,content,error", BAD_FILES, ids=[b[0] for b in BAD_FILES])
@pytest.mark.parametrize("kind", ["documents", "chat", "prompt_completion"])
def test_bad_files_are_named_with_the_format_expected(tmp_path, name, content, error, kind):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=error):
        build(kind, path)


@pytest.mark.parametrize("kind", ["documents", "prompt_completion"])
def test_other_splits_are_left_out_and_said(tmp_path, kind):
    """A hub layout's test split is not training data, and the summary says it was left out."""
    from engine.data.summary import summary

    recs = DOCS if kind == "documents" else PC
    ds = build(kind, write("hub_layout", recs, tmp_path))
    lines = summary(ds)
    assert (
        lines[-1]
        == f"{tmp_path / 'repo'}: the train split's 2 file(s) read; 1 file(s) of split 'test' left out"
    )
    flat = tmp_path / "flat"
    flat.mkdir()
    write("jsonl", recs, flat)
    assert not build(kind, flat).notes  # one split: nothing left out, nothing said


def test_directory_without_a_train_split(tmp_path):
    path = tmp_path / "repo"
    (path / "data").mkdir(parents=True)
    datasets.Dataset.from_list(DOCS).to_parquet(str(path / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"has no train split \(splits found: \['validation'\]\)"):
        build("documents", path)


def test_hub_id_offline_names_the_id_and_how_to_make_it_local(tmp_path):
    """A path that does not exist but reads as a hub id goes to datasets; offline, the error says what to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO)
    )
    code = (
        "from engine.config import DataConfig\nfrom engine.data import ByteTokenizer, build_dataset\n"
        "try:\n    build_dataset(DataConfig(kind='documents', path='someorg/somedata'), ByteTokenizer())\n"
        "except ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "'someorg/somedata' is not a local path" in out.stdout, out.stderr[-2000:]
    assert "save_to_disk(DIR)" in out.stdout
    with pytest.raises(ValueError, match=r"data.path: 'nope/x.jsonl' not found"):
        from engine.config_load import load_config

        load_config(None, ["--data.kind=documents", "--data.path=nope/x.jsonl"])


def cache_as_hub_dataset(hf_home: Path, repo_id: str, recs: list[dict]) -> None:
    """What ``load_dataset(repo_id)`` leaves in ``HF_HOME``'s datasets cache, built here from local records
    (datasets' json builder, then placed where its cache builder looks for ``owner___name``)."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    src = hf_home / f"{name}.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    builder = Json(cache_dir=str(hf_home / "build"), dataset_name=name, data_files={"train": [str(src)]})
    builder.download_and_prepare()
    shutil.copytree(builder.cache_dir, hf_home / "datasets" / f"{owner}___{name}" / "default" / "0.0.0" / "0")
    shutil.rmtree(hf_home / "build")
    src.unlink()


def test_hub_id_in_the_local_cache_reads_as_its_records(tmp_path):
    """A hub dataset id that datasets has cached (HF_HOME) loads offline, documents and chat alike, into the
    rows the same records give from a jsonl file; a mixture names one by id."""
    hf_home = tmp_path / "hf"
    cache_as_hub_dataset(hf_home, "someorg/docs", DOCS)
    cache_as_hub_dataset(hf_home, "someorg/chats", CHAT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    code = (
        "import json, sys\nsys.path.insert(0, sys.argv[1])\n"
        "from test_data_readers import build, rows\n"
        "from engine.config import DataConfig, MixtureSource\nfrom engine.data import ByteTokenizer, build_dataset\n"
        "mix = DataConfig(kind='documents', seq_len=48, mixture=[MixtureSource(path='someorg/docs')])\n"
        "print(json.dumps({'docs': rows(build('documents', 'someorg/docs')),\n"
        "                  'chats': rows(build('chat', 'someorg/chats')),\n"
        "                  'mixture': rows(build_dataset(mix, ByteTokenizer()))}))\n"
    )
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", code, here], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    docs = rows(build("documents", write("jsonl", DOCS, tmp_path / "a")))
    assert got["docs"] == docs and len(docs) > 1
    assert got["chats"] == rows(build("chat", write("jsonl", CHAT, tmp_path / "b")))
    assert sorted(map(json.dumps, got["mixture"])) == sorted(map(json.dumps, docs))


def test_long_documents_are_split_not_cut(tmp_path):
    """packing false: a document longer than seq_len gives all of its tokens, over several rows."""
    tok = ByteTokenizer()
    text = "".join(chr(97 + i % 26) for i in range(300))
    path = write("jsonl", [{"text": text}, {"text": "short"}], tmp_path)
    ds = build("documents", path, seq_len=64, packing=False)
    got = torch.cat([ds[i]["input_ids"][ds[i]["attention_mask"].bool()] for i in range(len(ds))])
    assert got.tolist() == [
        tok.bos_token_id,
        *text.encode(),
        tok.eos_token_id,
        tok.bos_token_id,
        *b"short",
        tok.eos_token_id,
    ]
    dropped = build("documents", path, seq_len=64, packing=False, truncation="drop")
    assert len(dropped) == 1 and dropped.dropped_tokens == 302
    with pytest.raises(ConfigError, match="data.truncation: 'left' does not apply to data.kind 'documents'"):
        DataConfig(kind="documents", path=str(path), truncation="left")
    with pytest.raises(ConfigError, match="data.truncation: 'split' does not apply to data.kind 'chat'"):
        DataConfig(kind="chat", path=str(path), tokenizer=TOKENIZER, truncation="split")
