"""Retrieval evaluation (engine/retrieval.py): items, determinism, a trained model against a random one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from engine import report
from engine.config import RetrievalConfig
from engine.data import ByteTokenizer, collate
from engine.options import ChunkOptions
from engine.retrieval import build_items, evaluate_items, filler_text

TOK = ByteTokenizer()
# Lengths the byte tokenizer's 75-token fixed part leaves 9..25 filler tokens in; 1-digit keys (chance 0.1).
GRID = RetrievalConfig(lengths=[84, 100], depths=[0.0, 0.5, 1.0], items=8, key_digits=1, seed=0)
TRAIN = RetrievalConfig(
    lengths=[80, 88, 96, 104], depths=[0.0, 0.25, 0.5, 0.75, 1.0], items=64, key_digits=1, seed=1
)


def tiny_byte_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=259, pad_token_id=256, bos_token_id=257, eos_token_id=258, max_position_embeddings=512,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_items_are_exact_length_deterministic_and_labelled_on_the_answer_only():
    a, b = build_items(GRID, TOK, None), build_items(GRID, TOK, None)
    assert [(c.length, c.depth) for c in a.cells] == [
        (84, 0.0),
        (84, 0.5),
        (84, 1.0),
        (100, 0.0),
        (100, 0.5),
        (100, 1.0),
    ]
    for ca, cb in zip(a.cells, b.cells, strict=True):
        for x, y in zip(ca.items, cb.items, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
            assert x["input_ids"].numel() == ca.length
            answer = x["labels"][x["labels"] != -100]
            assert answer.numel() == 1 and torch.equal(answer, x["input_ids"][-1:])
            text = bytes(x["input_ids"][1:].tolist()).decode()
            assert f"The pass key is {chr(int(answer))}. Remember it." in text
    # The needle moves back with the depth; other seeds draw other keys.
    where = [bytes(c.items[0]["input_ids"][1:].tolist()).decode().index("The pass key") for c in a.cells[3:]]
    assert where[0] < where[1] < where[2]
    other = build_items(RetrievalConfig(**{**GRID.__dict__, "seed": 1}), TOK, None)
    assert any(
        not torch.equal(x["input_ids"], y["input_ids"])
        for x, y in zip(a.cells[0].items, other.cells[0].items)
    )


def test_needle_items_and_filler_from_text():
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog " * 20, dtype=np.uint8).astype(
        np.int64
    )
    cfg = RetrievalConfig(lengths=[200], depths=[0.5], items=2, task="needle", key_digits=3)
    item = build_items(cfg, TOK, text).cells[0].items[0]
    decoded = bytes(item["input_ids"][1:].tolist()).decode()
    word = decoded.split("The magic number of ")[1].split(" ")[0]
    key = decoded[-3:]
    assert f"The magic number of {word} is {key}." in decoded
    assert decoded.endswith(f"What is the magic number of {word}? The magic number of {word} is {key}")
    assert "quick brown fox" in decoded
    rows = [
        {
            "input_ids": torch.tensor([257, *range(97, 123), 258, 256]),
            "attention_mask": torch.tensor([1] * 28 + [0]),
        }
    ]
    assert filler_text(rows, TOK, 100).tolist() == list(range(97, 123))  # bos / eos / padding dropped


def test_a_length_too_short_is_an_error_naming_it():
    with pytest.raises(ValueError, match="eval.retrieval.lengths: 40 tokens is too short"):
        build_items(RetrievalConfig(lengths=[40]), TOK, None)


def test_trained_model_scores_high_random_at_chance(tmp_path):
    """Plain backprop on items of other lengths and seeds (fast), scored chunk-wise on the grid."""
    items, options = build_items(GRID, TOK, None), ChunkOptions()
    model = tiny_byte_llama()
    random_acc = evaluate_items(model, items, 8, 32, options)
    assert random_acc["eval/retrieval_acc"] <= 0.3  # chance: 0.1

    by_length: dict[int, list] = {}
    for cell in build_items(TRAIN, TOK, None).cells:
        by_length.setdefault(cell.length, []).extend(cell.items)
    optim, rng = torch.optim.AdamW(model.parameters(), lr=3e-3), np.random.default_rng(0)
    for step in range(240):
        rows = by_length[TRAIN.lengths[step % 4]]
        batch = collate([rows[i] for i in rng.choice(len(rows), 16, replace=False)])
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    trained = evaluate_items(model, items, 8, 32, options)
    assert trained["eval/retrieval_acc"] >= 0.9, trained
    assert (
        evaluate_items(model, build_items(GRID, TOK, None), 3, 32, options) == trained
    )  # rerun: same scores

    # The heatmap of a run whose metrics hold the evaluation (as the trainer writes them).
    record = {"step": 7, "loss": 1.0, **trained}
    (tmp_path / report.METRICS_FILE).write_text(json.dumps(record) + "\n")
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / report.RETRIEVAL_FILE).stat().st_size > 1000
