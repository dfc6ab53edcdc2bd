"""Synthetic long-range tasks generated from a seed: kv_recall and passkey."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data.tokenizers import (
    IGNORE_INDEX,
    ByteTokenizer,
    Sample,
    Tokenizer,
    check_seq_len,
    encode_text,
    wrap_index,
)

SYNTHETIC_TASKS = ("kv_recall", "passkey")

# Keys and values of kv_recall are drawn from this alphabet; the filler is lowercase words only, so the
# markers "=", ";", "?" and ":" occur nowhere else and the query is unambiguous.
_KV_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_KV_LEN = 4
_FILLER_WORDS = 512
_FILLER_SEED = 0x5EC0  # fixed: the filler vocabulary is part of the task definition, not of the run seed


class SyntheticDataset(Dataset):
    """Long-range recall tasks whose answer sits at the very end and depends on the very beginning.

    ``kv_recall``: ``<bos>k3f9=ab12;x0qz=7hd1;...\\n`` + filler + ``\\n?k3f9:`` + ``ab12``
    ``passkey``:   ``<bos>`` + filler + `` The pass key is 48213. Remember it.`` (starting within the
    first 10% of the sequence) + filler + `` What is the pass key? The pass key is `` + ``48213``

    Only the answer tokens carry labels, so the loss measures the long-range dependency alone. Samples
    are exactly ``seq_len`` long and are generated lazily: sample ``i`` depends only on ``(seed, i)``,
    so a 1M-token dataset costs no memory and any access order gives the same data
    (about 0.1-0.2 s per 1M-token sample on one CPU core).

    Random strings (keys, values, digits) are tokenized one character at a time. With the byte
    tokenizer that changes nothing; with a BPE tokenizer it keeps the set of ids the dataset can emit
    small and known in advance (see ``max_token_id``), at the price of a slightly unnatural tokenization.
    """

    def __init__(
        self,
        task: str,
        seq_len: int,
        num_samples: int,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        num_pairs: int = 4,
    ) -> None:
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; expected one of {SYNTHETIC_TASKS}")
        check_seq_len(seq_len)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")  # numpy's SeedSequence rejects negatives
        if task == "kv_recall" and not 1 <= num_pairs <= 1000:
            raise ValueError(f"num_pairs must be in 1..1000, got {num_pairs}")
        self.task = task
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.seed = seed
        self.num_pairs = num_pairs
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if self.tokenizer.bos_token_id is None:
            raise ValueError("SyntheticDataset needs a tokenizer with a bos token")
        self._bos = np.asarray([self.tokenizer.bos_token_id], np.int64)

        self._pieces: dict[str, np.ndarray] = {}
        self._chars = {c: self._piece(c) for c in _KV_ALPHABET}
        self._build_filler_vocab()

        needed = self._fixed_len_bound()
        if seq_len < needed:
            raise ValueError(
                f"seq_len {seq_len} is too short for synthetic task {task!r}: needs at least {needed}"
            )

    # -- tokenized building blocks -------------------------------------------------------------------

    def _piece(self, text: str) -> np.ndarray:
        if text not in self._pieces:
            ids = encode_text(self.tokenizer, text)
            if ids.size == 0:
                raise ValueError(f"tokenizer encodes {text!r} to no tokens; cannot build the synthetic task")
            self._pieces[text] = ids
        return self._pieces[text]

    def _spell(self, s: str) -> np.ndarray:
        return np.concatenate([self._chars[c] for c in s])

    def _build_filler_vocab(self) -> None:
        # A fixed pool of pseudo-words, each tokenized once as " word". Filler is then sampled in token
        # space by gathering whole words, which is fast enough for 1M-token samples.
        rng = np.random.default_rng(_FILLER_SEED)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(_FILLER_WORDS)]
        encoded = [encode_text(self.tokenizer, " " + w) for w in words]
        self._word_lens = np.asarray([e.size for e in encoded], np.int64)
        self._word_starts = np.concatenate([[0], np.cumsum(self._word_lens)[:-1]])
        self._word_flat = np.concatenate(encoded)

    def _filler(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Exactly ``n`` filler tokens (the last word may be cut)."""
        if n <= 0:
            return np.empty(0, np.int64)
        mean_len = float(self._word_lens.mean())
        chosen: list[np.ndarray] = []
        have = 0
        while have < n:
            idx = rng.integers(0, _FILLER_WORDS, size=int((n - have) / mean_len) + 8)
            chosen.append(idx)
            have += int(self._word_lens[idx].sum())
        idx = np.concatenate(chosen)
        lens = self._word_lens[idx]
        # Vectorised gather of the chosen words' tokens: position j of the output reads
        # word_flat[start_of_its_word + offset_within_word].
        out_starts = np.cumsum(lens) - lens
        gather = np.arange(int(lens.sum())) + np.repeat(self._word_starts[idx] - out_starts, lens)
        return self._word_flat[gather[:n]]

    def _fixed_len_bound(self) -> int:
        """Upper bound on the non-filler tokens of a sample, so short seq_len fails at construction."""
        longest_char = max(c.size for c in self._chars.values())
        if self.task == "kv_recall":
            pair = 2 * _KV_LEN * longest_char + self._piece("=").size + self._piece(";").size
            query = self._piece("\n?").size + _KV_LEN * longest_char + self._piece(":").size
            return 1 + self.num_pairs * pair + self._piece("\n").size + query + _KV_LEN * longest_char
        digits = 5 * longest_char
        return (
            1
            + self._piece(" The pass key is ").size
            + digits
            + self._piece(". Remember it.").size
            + self._piece(" What is the pass key? The pass key is ").size
            + digits
        )

    # -- samples -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        index = wrap_index(index, self.num_samples, "samples")
        # The task is part of the seed so that two tasks with the same seed do not share filler.
        rng = np.random.default_rng((self.seed, SYNTHETIC_TASKS.index(self.task), index))
        if self.task == "kv_recall":
            ids, answer_len = self._kv_recall(rng)
        else:
            ids, answer_len = self._passkey(rng)
        assert ids.size == self.seq_len, (ids.size, self.seq_len)
        input_ids = torch.from_numpy(ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-answer_len:] = input_ids[-answer_len:]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}

    def _kv_recall(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        base = len(_KV_ALPHABET)

        def to_str(code: int) -> str:
            return "".join(_KV_ALPHABET[(code // base**k) % base] for k in range(_KV_LEN))

        # Distinct keys, so the query has exactly one correct answer; values may repeat.
        keys = [to_str(int(c)) for c in rng.choice(base**_KV_LEN, size=self.num_pairs, replace=False)]
        values = [to_str(int(c)) for c in rng.integers(0, base**_KV_LEN, size=self.num_pairs)]
        q = int(rng.integers(0, self.num_pairs))
        header = [self._bos]
        for k, v in zip(keys, values, strict=True):
            header += [self._spell(k), self._piece("="), self._spell(v), self._piece(";")]
        header.append(self._piece("\n"))
        query = [self._piece("\n?"), self._spell(keys[q]), self._piece(":")]
        answer = self._spell(values[q])
        fixed = sum(p.size for p in header) + sum(p.size for p in query) + answer.size
        filler = self._filler(rng, self.seq_len - fixed)
        return np.concatenate([*header, filler, *query, answer]), answer.size

    def _passkey(self, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        key = self._spell(str(int(rng.integers(10_000, 100_000))))
        intro = [self._piece(" The pass key is "), key, self._piece(". Remember it.")]
        question = self._piece(" What is the pass key? The pass key is ")
        fixed = 1 + sum(p.size for p in intro) + question.size + key.size
        free = self.seq_len - fixed
        # The intro starts within the first 10% of the sequence (never past the available filler).
        before = int(rng.integers(0, max(0, min(self.seq_len // 10 - 1, free)) + 1))
        parts = [
            self._bos,
            self._filler(rng, before),
            *intro,
            self._filler(rng, free - before),
            question,
            key,
        ]
        return np.concatenate(parts), key.size

    def row_lengths(self) -> np.ndarray:
        """Real tokens of every row: all of them (no padding)."""
        return np.full(len(self), self.seq_len, dtype=np.int64)

    def max_token_id(self) -> int:
        """Largest id any sample can contain (exact set: bos, fixed pieces, characters, filler words)."""
        candidates = [self._bos, self._word_flat, *self._pieces.values()]
        return int(max(int(c.max()) for c in candidates))

    @property
    def source(self) -> str:
        return f"synthetic task {self.task!r}"
