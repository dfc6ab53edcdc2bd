"""SFT data: chat and prompt/completion masks token by token, truncation, bad records, packing, --inspect.

The reference for chat masks is independent of engine/data/chat.py's prefix rendering: the shipped tiny
tokenizer's template marks assistant turns with {% generation %}, so HF's own
`apply_chat_template(..., return_assistant_tokens_mask=True)` says which tokens are the assistant's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tiny import grads_of, hf_assistant_mask, per_document_grads, rel_error, tiny_model

from engine.chunkwise import ChunkSchedule, chunkwise_backward
from engine.config import ConfigError, DataConfig
from engine.data import build_dataset, load_tokenizer
from engine.data.__main__ import main as inspect_main

DATA = Path(__file__).resolve().parent / "data" / "sft"
TOKENIZER = str(DATA / "tokenizer")
CHAT, PC = str(DATA / "chat.jsonl"), str(DATA / "prompt_completion.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def records(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


hf_mask = hf_assistant_mask


def dataset(kind, path, **kw):
    kw.setdefault("seq_len", 512)
    kw.setdefault("packing", False)
    return build_dataset(
        DataConfig(kind=kind, path=path, tokenizer=TOKENIZER, **kw), load_tokenizer(TOKENIZER)
    )


@pytest.mark.parametrize("assistant_loss", ["all", "last"])
def test_chat_labels_are_exactly_the_assistant_tokens(tok, assistant_loss):
    ds = dataset("chat", CHAT, assistant_loss=assistant_loss)
    assert len(ds) == len(records(CHAT))
    multi_turn = 0
    for i, rec in enumerate(records(CHAT)):
        ids, mask = hf_mask(tok, rec["messages"], last_only=assistant_loss == "last")
        row = ds[i]
        n = len(ids)
        assert row["input_ids"][:n].tolist() == ids  # the template's own rendering, token by token
        want = [t if m else -100 for t, m in zip(ids, mask)]
        assert row["labels"][:n].tolist() == want, (i, tok.decode(ids))
        assert (row["labels"][n:] == -100).all() and row["attention_mask"].tolist() == [1] * n + [0] * (
            512 - n
        )
        multi_turn += sum(m["role"] == "assistant" for m in rec["messages"]) > 1
    assert multi_turn >= 3  # the shipped data has multi-turn conversations


def test_prompt_completion_labels_are_exactly_the_completion(tok):
    ds = dataset("prompt_completion", PC)
    for i, rec in enumerate(records(PC)):
        head = [tok.bos_token_id, *tok.encode(rec["prompt"], add_special_tokens=False)]
        tail = [*tok.encode(rec["completion"], add_special_tokens=False), tok.eos_token_id]
        row = ds[i]
        n = len(head) + len(tail)
        assert row["input_ids"][:n].tolist() == head + tail
        assert row["labels"][:n].tolist() == [-100] * len(head) + tail


def test_left_truncation_keeps_the_answer(tok):
    rec = records(CHAT)[5]  # the long "key" conversation: 106 tokens, answer at the end
    ids, mask = hf_mask(tok, rec["messages"])
    ds = dataset("chat", CHAT, seq_len=60)
    s = ds.samples[5]
    assert s.truncated == len(ids) - 60 and s.ids == ids[-60:] and s.loss == mask[-60:]
    assert "7391" in tok.decode([t for t, m in zip(s.ids, s.loss) if m])
    # Multi-turn: truncating into the conversation drops early turns' context first, keeps the last answer.
    rec = records(CHAT)[4]
    ids, mask = hf_mask(tok, rec["messages"])
    ds = dataset("chat", CHAT, seq_len=len(ids) - 20)
    s = ds.samples[4]
    assert s.ids == ids[20:] and s.loss == mask[20:] and tok.decode(s.ids).endswith("Grazie.<|im_end|>\n")
    assert sum(1 for x in ds.samples if x.truncated) >= 2


def test_answer_longer_than_seq_len_and_other_truncation_modes():
    with pytest.raises(
        ValueError, match=r"chat.jsonl, line 2: the answer alone is \d+ tokens, more than data.seq_len 8"
    ):
        dataset("chat", CHAT, seq_len=8)
    ds = dataset("chat", CHAT, seq_len=40, truncation="drop")
    assert sum(ds.dropped.values()) == len(records(CHAT)) - len(ds.samples) > 0
    with pytest.raises(
        ValueError, match=r"line 1: 39 tokens, more than data.seq_len 30 \(data.truncation: error\)"
    ):
        dataset("chat", CHAT, seq_len=30, truncation="error")


BAD = [
    (
        {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.role: missing",
    ),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]\.role: 'robot' is not one of"),
    (
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.content: empty",
    ),
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    (
        {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.content\[0\]: a content part must be an object with a type",
    ),
    (
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
        r"content: must be a string or a list of text parts, got int",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "url": "x"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        r"messages\[0\]\.content\[0\]\.type: 'image' parts are not supported",
    ),
    (
        {"messages": [{"role": "user", "content": "hi", "weight": 0}, {"role": "assistant", "content": "x"}]},
        r"messages\[0\]\.weight: not a key of a 'user' message \(allowed: role, content\)",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"name": "f"}]},
            ]
        },
        r"messages\[1\]\.tool_calls\[0\]\.function\.name: missing",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        r"messages\[1\]\.content: empty",
    ),
    ({"msgs": []}, r"no field 'messages' \(data.messages_field\)"),
]


@pytest.mark.parametrize("record,error", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_chat_records_name_the_record_and_field(tmp_path, record, error):
    good = records(CHAT)[0]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, good, record)) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl, line 3: .*{error}"):
        dataset("chat", str(path))


def test_bad_prompt_completion_records_and_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"line 2: no field 'completion' \(data.completion_field\)"):
        dataset("prompt_completion", str(path))
    path.write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(ValueError, match="line 1: completion must be a string, got int"):
        dataset("prompt_completion", str(path))
    path.write_text('{"prompt": "a",\n')
    with pytest.raises(ValueError, match=r"could not read .*bad.jsonl' as jsonl .*JSON parse error"):
        dataset("prompt_completion", str(path))
    with pytest.raises(ConfigError, match="data.kind 'chat' needs a local tokenizer directory"):
        DataConfig(kind="chat", path=CHAT)


def test_bad_records_fail_before_any_process_group(tmp_path):
    from engine.config_load import load_config
    from engine.trainer import prepare

    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = load_config(
        str(Path(__file__).resolve().parents[1] / "configs" / "sft-chat-32k.yaml"),
        [
            f"--data.path={path}",
            f"--data.tokenizer={TOKENIZER}",
            "--model.name_or_path=null",
            "--model.hf_config={model_type: llama, vocab_size: 400, pad_token_id: 0}",
            f"--checkpoint.dir={tmp_path}/ckpt",
            f"--logging.dir={tmp_path}/log",
        ],
    )
    with pytest.raises(ValueError, match="line 1: messages has no assistant turn"):
        prepare(cfg)
    assert not dist.is_initialized()


def test_packed_rows_train_like_their_samples_one_per_row():
    """Packed SFT rows (positions restarting per sample) give the gradient of the same samples one per row."""
    packed = dataset("prompt_completion", PC, seq_len=64, packing=True)
    single = dataset("prompt_completion", PC, seq_len=64, packing=False)
    assert len(packed) < len(single) and "position_ids" in packed[0]
    model = tiny_model("LlamaConfig", torch.float64, vocab_size=400)

    def grads(ds):
        batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}
        model.zero_grad(set_to_none=True)
        stats = chunkwise_backward(model, **batch, schedule=ChunkSchedule(chunk_size=16))
        return stats, grads_of(model)

    (a, ga), (b, gb) = grads(packed), grads(single)
    assert a.num_tokens == b.num_tokens and a.loss == pytest.approx(b.loss, rel=1e-12)
    assert rel_error(ga, gb) <= 1e-12


def test_inspect_prints_marked_samples_and_a_summary(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {hf_config: {model_type: llama, vocab_size: 400, pad_token_id: 0}, dtype: float32}\n"
        f"data: {{kind: chat, path: {CHAT}, tokenizer: {TOKENIZER}, seq_len: 60}}\n"
        "optim: {steps: 1}\n"  # a run config names its length: optim.steps or optim.epochs
    )
    assert inspect_main(["--config", str(cfg), "--inspect", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[Paris.<|im_end|>]]" in out and "[[17 + 25 = 42.<|im_end|>]]" in out
    assert "--- sample 2" not in out and "samples: 12" in out and "loss tokens:" in out
    assert (
        "truncated (oldest tokens dropped, data.truncation: left): 3" in out and "packing: 12 samples" in out
    )


def test_raw_text_packing_restarts_positions_per_document():
    """data.packing for jsonl/parquet/text: documents cut into blocks keep to themselves (position_ids
    restart where a document starts, and at a block's start), and a block trains like its pieces alone."""
    from engine.data.packing import PackedDataset

    g = torch.Generator().manual_seed(0)
    tokens, offsets = torch.randint(3, 97, (40,), generator=g), torch.tensor([0, 5, 17, 18, 40])
    ds = PackedDataset(tokens, offsets, 16, "test")
    assert [ds[i]["position_ids"].tolist() for i in range(2)] == [
        [0, 1, 2, 3, 4, *range(11)],
        [0, 0, *range(14)],
    ]
    model = tiny_model("LlamaConfig", torch.float64)
    row = {k: v[None] for k, v in ds[1].items()}
    _, _, ref = per_document_grads(model, row["input_ids"], row["labels"], [[1, 1, 14]])
    model.zero_grad(set_to_none=True)
    chunkwise_backward(model, **row, schedule=ChunkSchedule(chunk_size=4))
    assert rel_error(grads_of(model), ref) <= 1e-12
