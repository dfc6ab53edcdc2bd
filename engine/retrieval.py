"""Long-context retrieval: needle / passkey items at a grid of lengths x depths, scored by exact match.

An item of length L and depth d is exactly L tokens of the run's own tokenizer:

    <bos> filler[:a]  NEEDLE  filler[a:]  QUESTION  ANSWER        a = round(d x len(filler))

    passkey  NEEDLE    " The pass key is 48213. Remember it."
             QUESTION  " What is the pass key? The pass key is "              ANSWER "48213"
    needle   NEEDLE    " The magic number of wopk is 48213."
             QUESTION  " What is the magic number of wopk? The magic number of wopk is "

Digits are tokenized one at a time (as in engine/data/synthetic.py), so the answer's tokens are the same
wherever the key appears and every tokenizer answers with key_digits tokens. The filler is the eval set's
text, else the training text (special tokens dropped; a window at a random offset), else, for synthetic
data, pseudo-words. Items depend only on eval.retrieval (seed, task, key_digits, items), the tokenizer and
that text: every evaluation of a run, and a rerun, scores the same items.

An item is answered when the argmax of the logits at every answer position is the answer's token, fed the
true answer before it (teacher forcing): one chunk-wise forward without a graph (engine/chunk_eval.py), no
generation loop, so an item costs what pass 1 of a training step of that length costs. Accuracy per cell is
the fraction of its items answered; ranks score a shard of each cell's items and the counts are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from engine.chunk_eval import score
from engine.config import RetrievalConfig
from engine.data.tokenizers import encode_text
from engine.evaluate import batch_of, device_of, eval_mode, eval_shard, reduce_sum, shard_batches
from engine.options import ChunkOptions

_WORDS_SEED = 0x5EC0  # the pseudo-word pool is part of the task definition, not of the run's seed
_NUM_WORDS = 512
_TASKS = ("passkey", "needle")


@dataclass
class Cell:
    length: int
    depth: float
    items: list[dict[str, torch.Tensor]]  # input_ids, labels (the answer only), attention_mask; length each


@dataclass
class RetrievalSet:
    cells: list[Cell]  # lengths x depths, length-major

    @property
    def lengths(self) -> list[int]:
        return list(dict.fromkeys(c.length for c in self.cells))

    @property
    def depths(self) -> list[float]:
        return list(dict.fromkeys(c.depth for c in self.cells))


class _Pieces:
    """Token ids of the fixed phrases, digits and pseudo-words under one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        self.digits = [self.encode(str(d)) for d in range(10)]
        rng = np.random.default_rng(_WORDS_SEED)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        self.words = ["".join(rng.choice(letters, size=int(rng.integers(3, 8)))) for _ in range(_NUM_WORDS)]
        self.word_ids = [self.encode(" " + w) for w in self.words]

    def encode(self, text: str) -> np.ndarray:
        ids = encode_text(self.tokenizer, text)
        if ids.size == 0:
            raise ValueError(f"eval.retrieval: the tokenizer encodes {text!r} to no tokens")
        return ids

    def spell(self, digits: np.ndarray) -> np.ndarray:
        return np.concatenate([self.digits[int(d)] for d in digits])


def filler_text(dataset: Dataset | None, tokenizer, want: int) -> np.ndarray | None:
    """Up to `want` tokens of the dataset's text (loss-bearing or not, special tokens dropped), read row
    by row from the first; None for synthetic data or no text."""
    if dataset is None or _is_synthetic(dataset):
        return None
    special = {
        t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None
    }
    taken, have = [], 0
    for i in range(len(dataset)):
        row = dataset[i]
        ids = row["input_ids"][row["attention_mask"].bool()].numpy()
        ids = ids[~np.isin(ids, list(special))]
        taken.append(ids)
        have += ids.size
        if have >= want:
            break
    text = np.concatenate(taken) if taken else np.empty(0, np.int64)
    return text if text.size >= 16 else None


def _is_synthetic(dataset: Dataset) -> bool:
    from engine.data.synthetic import SyntheticDataset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, SyntheticDataset)


def build_items(cfg: RetrievalConfig, tokenizer, text: np.ndarray | None) -> RetrievalSet:
    """The grid's items (engine/config.py RetrievalConfig); a length too short for the item's fixed part is
    a ValueError naming it."""
    pieces = _Pieces(tokenizer)
    cells = []
    for length in cfg.lengths:
        for di, depth in enumerate(cfg.depths):
            items = [
                _item(cfg, pieces, text, length, depth, (cfg.seed, length, di, i)) for i in range(cfg.items)
            ]
            cells.append(Cell(length, depth, items))
    return RetrievalSet(cells)


def _item(cfg: RetrievalConfig, p: _Pieces, text, length: int, depth: float, seed) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng((*seed, _TASKS.index(cfg.task)))
    key = p.spell(rng.integers(0, 10, size=cfg.key_digits))
    if cfg.task == "passkey":
        needle = [p.encode(" The pass key is "), key, p.encode(". Remember it.")]
        question = p.encode(" What is the pass key? The pass key is ")
    else:
        word = p.words[int(rng.integers(0, _NUM_WORDS))]
        needle = [p.encode(f" The magic number of {word} is "), key, p.encode(".")]
        question = p.encode(f" What is the magic number of {word}? The magic number of {word} is ")
    fixed = len(p.bos) + sum(x.size for x in needle) + question.size + key.size
    free = length - fixed
    if free < 0:
        raise ValueError(
            f"eval.retrieval.lengths: {length} tokens is too short for a {cfg.task} item with this tokenizer "
            f"(its fixed part alone is {fixed} tokens)"
        )
    filler = _filler(p, text, free, rng)
    before = round(depth * free)
    ids = np.concatenate(
        [np.asarray(p.bos, np.int64), filler[:before], *needle, filler[before:], question, key]
    )
    assert ids.size == length, (ids.size, length)
    input_ids = torch.from_numpy(ids)
    labels = torch.full_like(input_ids, -100)
    labels[-key.size :] = input_ids[-key.size :]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def _filler(p: _Pieces, text: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` filler tokens: a window of the text at a random offset (the text repeated if shorter), or
    pseudo-words (the last one cut)."""
    if n == 0:
        return np.empty(0, np.int64)
    if text is not None:
        reps = -(-n // text.size) + 1
        source = np.tile(text, reps) if reps > 1 else text
        start = int(rng.integers(0, source.size - n + 1))
        return source[start : start + n]
    out, have = [], 0
    while have < n:
        word = p.word_ids[int(rng.integers(0, _NUM_WORDS))]
        out.append(word)
        have += word.size
    return np.concatenate(out)[:n]


# ---------------------------------------------------------------------------------------------- scoring


def evaluate_items(
    model, items: RetrievalSet, batch_size: int, chunk_size: int, options: ChunkOptions
) -> dict:
    """{'eval/retrieval': [{length, depth, accuracy, items}, ...], 'eval/retrieval_acc': the mean}, all
    ranks together (the model is put in eval mode for the duration)."""
    shard = eval_shard(model)
    device = device_of(model)
    counts: list[float] = []
    with eval_mode(model):
        for cell in items.cells:
            answered = total = 0
            for rows in shard_batches(range(len(cell.items)), shard.index, shard.count, batch_size):
                b = batch_of(cell.items, rows, 0, device)
                s = score(
                    model,
                    b["input_ids"],
                    labels=b["labels"],
                    chunk_size=chunk_size,
                    options=options,
                    argmax=True,
                    sequence_group=shard.group,
                )
                if shard.counts:
                    hit = (s.row_correct == s.row_tokens) & (s.row_tokens > 0)
                    answered, total = answered + int(hit.sum()), total + len(rows)
            counts += [answered, total]
    counts = reduce_sum(counts, device)
    cells = [
        {
            "length": c.length,
            "depth": c.depth,
            "accuracy": counts[2 * i] / counts[2 * i + 1],
            "items": int(counts[2 * i + 1]),
        }
        for i, c in enumerate(items.cells)
    ]
    mean = sum(c["accuracy"] for c in cells) / len(cells)
    return {"eval/retrieval": cells, "eval/retrieval_acc": mean}
